"""The FUSE view: its tree, the FUSE operations, reads at the view's point, the poke helper and the mount
(docs/ARCHITECTURE.md "Layout", "Poke", "Reads"). Never imports mirrorfs.stream."""
