"""The house's rules, read from every module's imports (function-level imports included): data flows one way,
tap -> inference -> mirrorfs; inference knows no sockets or FUSE; the view and the stream never import each
other; and no import cycle anywhere (docs/ARCHITECTURE.md "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("tap", "inference", "mirrorfs")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Every module of ours, and every top-level foreign package, that `path` imports anywhere."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known and "." in t:
                t = t.rpartition(".")[0]
            found.add(t)
    found.discard(name)
    return found


GRAPH = {name: _imports(path, name, _modules()) for name, path in _modules().items()}


def _ours(targets: set[str]) -> set[str]:
    return {t for t in targets if t.split(".")[0] in PACKAGES}


def test_data_flows_one_way():
    rank = {"tap": 0, "inference": 1, "mirrorfs": 2}
    back = [(m, t) for m, ts in GRAPH.items() for t in _ours(ts) if rank[t.split(".")[0]] > rank[m.split(".")[0]]]
    assert not back, f"imports against tap -> inference -> mirrorfs: {back}"


def test_inference_knows_no_sockets_or_fuse():
    foreign = {"socket", "trio", "pyfuse3", "http", "redis", "socketserver"}
    bad = [(m, t) for m, ts in GRAPH.items() if m.startswith("inference") for t in ts if t.split(".")[0] in foreign]
    assert not bad, bad


def test_the_view_and_the_stream_never_import_each_other():
    bad = [(m, t) for m, ts in GRAPH.items() for t in _ours(ts)
           if {m.split(".")[:2][-1], t.split(".")[:2][-1]} == {"view", "stream"} and m.startswith("mirrorfs.")
           and t.startswith("mirrorfs.")]
    assert not bad, bad
    up = [(m, t) for m, ts in GRAPH.items() for t in _ours(ts)
          if m.startswith(("mirrorfs.view", "mirrorfs.stream")) and t.startswith("mirrorfs.cli")]
    assert not up, f"the CLI is the top room: nothing imports it {up}"
    assert not [m for m in GRAPH if m.startswith("mirrorfs.") and m.count(".") == 1
                and m not in ("mirrorfs.cli", "mirrorfs.view", "mirrorfs.stream")], "mirrorfs/ holds only its rooms"


def test_no_import_cycle():
    graph = {m: _ours(ts) & GRAPH.keys() for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_cycle_and_a_back_import():
    """The rules above would catch a break: the graph holds function-level imports too."""
    assert "mirrorfs.stream.render" in GRAPH["mirrorfs.cli.stream"]       # imported inside a function
    assert "inference.engine" in GRAPH["inference.view"]
