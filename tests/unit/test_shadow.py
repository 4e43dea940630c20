"""The shadow tree as the index file stores it: a pickle round trip keeps every field of every node."""

from __future__ import annotations

import pickle

from inference.shadow import ROOT_INO, Node, ShadowTree


def test_pickle_round_trip_keeps_every_node_field_and_name() -> None:
    tree = ShadowTree()
    tree.add_node(Node(ROOT_INO, "dir", mode=0o40755, links=3))
    tree.add_node(Node(11, "dir", mode=0o40700, links=2))
    # every field away from its default, each with a value of its own: a field stored in the wrong slot shows
    full = Node(12, "file", mode=0o100640, uid=1000, gid=100, size=5000, mtime_ns=111, ctime_ns=222, links=2,
                rdev=7, target=b"t", xattrs={"user.k": b"v"}, extents=((0, 900, 2, False), (2, 950, 1, True)),
                meta_blocks=(33,), xattr_block=44, gen=55, name_ctime_ns=66, entries_changed=True, sig=77,
                atime_ns=333, blocks=8, flags=0x80000)
    tree.add_node(full)
    tree.add_name(ROOT_INO, b"d", 11)
    tree.add_name(ROOT_INO, b"f", 12)
    tree.add_name(11, b"hard", 12)

    back = pickle.loads(pickle.dumps(tree, protocol=pickle.HIGHEST_PROTOCOL))

    assert back.nodes == tree.nodes and back.children == tree.children
    assert back.nodes[12] is not full and back.nodes[12].names == ((ROOT_INO, b"f"), (11, b"hard"))
    assert back.path(12) == b"/f" and back.name_path(11, b"hard") == b"/d/hard"
    back.add_name(11, b"more", 12)  # the loaded tree is a working tree, not a view of the old one
    assert (11, b"more") not in tree.nodes[12].names
    assert back.remove_name(ROOT_INO, b"f") == 12 and back.nodes[12].names == ((11, b"hard"), (11, b"more"))
    assert tree.nodes[12].names == ((ROOT_INO, b"f"), (11, b"hard"))
