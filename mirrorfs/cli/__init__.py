"""The `mirrorfs` command: argument parsing and one function per subcommand (docs/ARCHITECTURE.md "Layout")."""
