"""The shadow tree's array store (inference/shadow.py) behaves as the plain dicts it replaces: the same random
operations on a ShadowTree and on a dict model give the same nodes, entries and paths, through bulk builds,
pickling (the index file) and changes in place."""

from __future__ import annotations

import dataclasses
import pickle
import random

import pytest

from inference.shadow import ROOT_INO, Node, ShadowTree


class DictTree:
    """The shadow tree as it was: plain dicts (the reference)."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self.children: dict[int, dict[bytes, int]] = {}

    def add_node(self, node: Node) -> None:
        self.nodes[node.ino] = node
        if node.type == "dir":
            self.children.setdefault(node.ino, {})

    def drop_node(self, ino: int) -> None:
        self.nodes.pop(ino, None)
        self.children.pop(ino, None)

    def add_name(self, parent: int, name: bytes, ino: int) -> None:
        self.children.setdefault(parent, {})[name] = ino
        node = self.nodes.get(ino)
        if node is not None and (parent, name) not in node.names:
            node.names += ((parent, name),)

    def remove_name(self, parent: int, name: bytes) -> None:
        ino = self.children.get(parent, {}).pop(name, None)
        if ino is not None and (node := self.nodes.get(ino)) is not None and (parent, name) in node.names:
            i = node.names.index((parent, name))
            node.names = node.names[:i] + node.names[i + 1:]


def _node(rng: random.Random, ino: int) -> Node:
    kind = rng.choice(["dir", "file", "file", "symlink"])
    big = rng.choice([0, 1, 2**31, 2**63 - 1, 2**70, -(2**40)])   # values past 64 bits stay exact (a list column)
    extents = tuple((i * 8, rng.randrange(2**40), rng.randrange(1, 9), rng.random() < 0.3)
                    for i in range(rng.choice([0, 0, 1, 3])))
    return Node(ino=ino, type=kind, mode=rng.randrange(1 << 16), uid=rng.randrange(70000), gid=rng.randrange(3),
                size=rng.randrange(1 << 40), mtime_ns=big, ctime_ns=rng.randrange(-(2**62), 2**62),
                links=rng.randrange(5), rdev=rng.randrange(1 << 20), atime_ns=big, blocks=rng.randrange(1 << 33),
                flags=rng.randrange(1 << 32), target=b"t/" * rng.randrange(3) if kind == "symlink" else None,
                xattrs={"user.k": bytes([rng.randrange(256)])} if rng.random() < 0.2 else None, extents=extents,
                meta_blocks=tuple(rng.randrange(1 << 32) for _ in range(rng.choice([0, 2]))),
                xattr_block=rng.choice([0, 123456789]), gen=rng.randrange(1 << 32), name_ctime_ns=big,
                entries_changed=rng.random() < 0.5, sig=rng.randrange(1 << 32))


def _name(rng: random.Random) -> bytes:
    return bytes(rng.choice(b"abc\xff.") for _ in range(rng.randrange(1, 4)))


def _same(tree: ShadowTree, ref: DictTree) -> None:
    assert len(tree) == len(ref.nodes) and len(tree.children) == len(ref.children)
    assert set(tree.nodes) == set(ref.nodes) and set(tree.children) == set(ref.children)
    for ino, node in ref.nodes.items():
        assert tree.peek(ino) == node and ino in tree.nodes
        assert tree.path(ino) == _ref_path(ref, ino)
    for d, entries in ref.children.items():
        assert list(tree.entries(d).items()) == list(entries.items())   # in the order the names came
        assert d in tree.children
    assert dict(tree.nodes.items()) == ref.nodes
    for ino in (0, 1, 10**6, 2**40):
        assert ino not in tree.nodes and tree.nodes.get(ino) is None and tree.peek(ino) is None
        assert ino not in tree.children and tree.entries(ino) == {}


def _ref_path(ref: DictTree, ino: int) -> bytes | None:
    parts, seen = [], set()
    while ino != ROOT_INO:
        node = ref.nodes.get(ino)
        if node is None or not node.names or ino in seen:
            return None
        seen.add(ino)
        ino, name = node.names[0]
        parts.append(name)
    return b"/" + b"/".join(reversed(parts))


def _build(rng: random.Random, n: int) -> tuple[ShadowTree, DictTree]:
    """A random tree built as the handler's index does (bulk: each directory listed once, names unique in it)."""
    tree, ref = ShadowTree(), DictTree()
    with tree.bulk():
        root = dataclasses.replace(_node(rng, ROOT_INO), type="dir")
        for t in (tree, ref):
            t.add_node(dataclasses.replace(root))
        dirs = [ROOT_INO]
        for ino in range(11, 11 + n):
            d = rng.choice(dirs)
            name = _name(rng) + str(ino).encode()
            if rng.random() < 0.9:
                node = _node(rng, ino)
                if rng.random() < 0.1:   # a node that comes with a name (kept in its names, not in an entry)
                    node.names = ((rng.choice(dirs), b"pre%d" % ino),)
                for t in (tree, ref):
                    t.add_node(dataclasses.replace(node))
                if node.type == "dir":
                    dirs.append(ino)
            for t in (tree, ref):   # (1 in 10 names an inode not in the tree: an entry with no node)
                t.add_name(d, name, ino)
            assert (ino in tree.nodes) == (ino in ref.nodes)
        if n > 2:   # a hard link: a second name of a node already added
            ino = rng.choice([i for i in ref.nodes if i != ROOT_INO])
            for t in (tree, ref):
                t.add_name(ROOT_INO, b"link", ino)
        assert len(tree) == len(ref.nodes)
    return tree, ref


@pytest.mark.parametrize("seed", range(12))
def test_the_store_answers_as_the_dicts_through_builds_changes_and_pickles(seed: int) -> None:
    rng = random.Random(seed)
    tree, ref = _build(rng, rng.choice([0, 1, 5, 200]))
    _same(tree, ref)
    for step in range(300):
        inos = list(ref.nodes) or [ROOT_INO]
        op = rng.random()
        if op < 0.2:
            ino = rng.choice(inos + [rng.randrange(11, 400)])
            node = _node(rng, ino)
            tree.add_node(dataclasses.replace(node))
            ref.add_node(node)
        elif op < 0.3:
            ino = rng.choice(inos)
            tree.drop_node(ino)
            ref.drop_node(ino)
        elif op < 0.5:
            parent, ino, name = rng.choice(list(ref.children) or [ROOT_INO]), rng.choice(inos), _name(rng)
            tree.add_name(parent, name, ino)
            ref.add_name(parent, name, ino)
        elif op < 0.65:
            parent = rng.choice(list(ref.children) or [ROOT_INO])
            names = list(ref.children.get(parent, {})) or [b"none"]
            name = rng.choice(names)
            tree.remove_name(parent, name)
            ref.remove_name(parent, name)
        elif op < 0.85:   # a change in place, as the reconciler makes them: it must stick
            ino = rng.choice(inos)
            if ino in ref.nodes:
                value = rng.choice([0, 7, 2**64 + 1])
                tree.nodes[ino].size = value
                ref.nodes[ino].size = value
                assert tree.nodes.get(ino) is tree.nodes[ino]
        elif op < 0.9:
            tree = pickle.loads(pickle.dumps(tree, protocol=pickle.HIGHEST_PROTOCOL))
        else:
            ino = rng.choice(inos)
            assert tree.lookup(ROOT_INO, b"link") == ref.children.get(ROOT_INO, {}).get(b"link")
            assert (tree.nodes.pop(ino, None) is None) == (ref.nodes.pop(ino, None) is None)
        if step % 50 == 0:
            _same(tree, ref)
    _same(tree, ref)
    _same(pickle.loads(pickle.dumps(tree)), ref)


def test_a_tree_in_bulk_answers_membership_and_refuses_the_rest() -> None:
    tree = ShadowTree()
    with tree.bulk():
        tree.add_node(Node(ROOT_INO, "dir"))
        tree.add_node(Node(12, "file"))
        tree.add_name(ROOT_INO, b"f", 12)
        assert 12 in tree.nodes and ROOT_INO in tree.children and len(tree) == 2
        with pytest.raises(RuntimeError):
            tree.nodes.get(12)           # not answerable until the build ends: an error, never a wrong None
        with pytest.raises(RuntimeError):
            tree.add_node(Node(12, "file"))
        with pytest.raises(RuntimeError):
            pickle.dumps(tree)
    assert tree.nodes[12].names == ((ROOT_INO, b"f"),) and tree.path(12) == b"/f"
    with pytest.raises(RuntimeError):
        with tree.bulk():
            pass


def test_an_index_of_another_format_loads_as_an_empty_tree() -> None:
    """(load_index then refuses the file by its format number, with a message to rebuild it.)"""
    tree = ShadowTree.__new__(ShadowTree)
    tree.__setstate__({"columns": {}, "children": {}})   # format 5
    assert len(tree) == 0 and tree.path(12) is None


def test_reading_the_whole_tree_makes_nothing_resident() -> None:
    """A walk (the view's snapshot) reads with peek/entries/path: the overlay stays empty, so a loaded index keeps
    its size however often it is walked."""
    tree, ref = _build(random.Random(7), 300)
    for ino in ref.nodes:
        tree.peek(ino)
        tree.path(ino)
    for d in ref.children:
        tree.entries(d)
    list(tree.nodes.items())
    list(tree.children.items())
    assert not tree.nodes._over and not tree.children._over
