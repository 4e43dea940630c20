"""Event filters: one compact, serializable Filter, applied the same way at every layer.

Layered filtering is the scalability claim: the subscription socket, the host publisher and the central
collector each pass on only what the layer above asked for, so a filter must mean exactly the same thing
everywhere. It travels as JSON (`{"paths": [...], "kinds": [...], "fs": [...], "vm": [...]}`), comes from
untrusted peers (a subscriber's first line), and so is bounded in size and compiled without backtracking traps.

Path globs: `**` matches any number of whole path components (`/etc/**` = everything below /etc, not /etc
itself; `/**/passwd` = a passwd anywhere), `*` any run of characters within one component, `?` one character,
`[abc]` / `[!abc]` a character class. An event matches a path glob if its path or (rename) its old path does.
Empty or missing lists match everything; the conditions of different fields must all hold.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from inference.events import KINDS

MAX_FILTER_BYTES = 8192     # the JSON form
MAX_ITEMS = 64              # per field
MAX_GLOB_LEN = 1024
MAX_STARS = 16              # per glob: bounds the matcher's work on hostile patterns
FIELDS = ("paths", "kinds", "fs", "vm")


class FilterError(ValueError):
    """A filter that is malformed or too large; the message says which rule it broke."""


Token = tuple[str, object]   # ("lit", "x") | ("one", None) | ("star", None) | ("class", (negated, chars))


def _class_chars(body: str) -> frozenset[str] | tuple[tuple[str, str], ...]:
    """The members of a [...] body as ranges (a-z) and single characters."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            out.append((body[i], body[i + 2]))
            i += 3
        else:
            out.append((body[i], body[i]))
            i += 1
    return tuple(out)


def compile_component(comp: str, glob: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(comp)
    while i < n:
        c = comp[i]
        if c == "*":
            if not tokens or tokens[-1][0] != "star":
                tokens.append(("star", None))
        elif c == "?":
            tokens.append(("one", None))
        elif c == "[":
            neg = comp.startswith("[!", i)
            first = i + (2 if neg else 1)
            end = comp.find("]", first + 1 if first < n and comp[first] == "]" else first)
            if end < 0:
                raise FilterError(f"unclosed '[' in {glob!r}")
            body = comp[first:end]
            if not body:
                raise FilterError(f"empty character class in {glob!r}")
            tokens.append(("class", (neg, _class_chars(body))))
            i = end
        else:
            tokens.append(("lit", c))
        i += 1
    return tokens


def _one(tok: Token, ch: str) -> bool:
    kind, arg = tok
    if kind == "lit":
        return arg == ch
    if kind == "one":
        return True
    neg, ranges = arg  # type: ignore[misc]
    return any(lo <= ch <= hi for lo, hi in ranges) != neg


def match_component(tokens: list[Token], s: str) -> bool:
    """Wildcard match of one path component, O(len(tokens) * len(s)): the greedy algorithm that only ever
    backtracks to the last star (no exponential blow-up on hostile globs)."""
    ti = si = 0
    star_t, star_s = -1, 0
    while si < len(s):
        if ti < len(tokens) and tokens[ti][0] != "star" and _one(tokens[ti], s[si]):
            ti += 1
            si += 1
        elif ti < len(tokens) and tokens[ti][0] == "star":
            star_t, star_s = ti, si
            ti += 1
        elif star_t >= 0:
            ti = star_t + 1
            star_s += 1
            si = star_s
        else:
            return False
    while ti < len(tokens) and tokens[ti][0] == "star":
        ti += 1
    return ti == len(tokens)


class PathGlob:
    """One compiled glob: components, with "**" matching any number of whole components."""

    def __init__(self, glob: str) -> None:
        self.glob = glob
        self.parts: list[list[Token] | None] = []   # None stands for "**"
        for comp in glob.split("/")[1:]:
            if "**" in comp:
                if comp.strip("*") or len(comp) < 2:
                    raise FilterError(f"'**' must be a whole path component: {glob!r}")
                if self.parts and self.parts[-1] is None:
                    continue
                self.parts.append(None)
            else:
                self.parts.append(compile_component(comp, glob))

    def match(self, path: str) -> bool:
        comps = path.split("/")[1:] if path.startswith("/") else None
        if comps is None:
            return False
        parts = self.parts
        if parts and parts[-1] is None and len(parts) == 1:
            return path != "/"
        memo: dict[tuple[int, int], bool] = {}

        def go(i: int, j: int) -> bool:
            key = (i, j)
            if key in memo:
                return memo[key]
            if i == len(parts):
                r = j == len(comps)
            elif parts[i] is None:
                if i == len(parts) - 1:
                    r = j < len(comps)          # trailing /** : at least one more component
                else:
                    r = any(go(i + 1, k) for k in range(j, len(comps) + 1))
            else:
                r = j < len(comps) and match_component(parts[i], comps[j]) and go(i + 1, j + 1)
            memo[key] = r
            return r

        return go(0, 0)


def literal_prefix(glob: str) -> str:
    """The directory a glob cannot match outside of ("/etc/**" -> "/etc", "/var/*/x" -> "/var", "*" -> "")."""
    parts: list[str] = []
    for part in glob.split("/")[:-1]:
        if any(ch in part for ch in "*?["):
            break
        parts.append(part)
    return "/".join(parts)


@dataclass(frozen=True)
class Filter:
    """Which events a consumer wants. Immutable; build with `Filter.from_obj`/`from_json`/`make`."""

    paths: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    fs: tuple[str, ...] = ()
    vm: tuple[str, ...] = ()
    _globs: tuple[PathGlob, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def make(cls, *, paths: Iterable[str] = (), kinds: Iterable[str] = (), fs: Iterable[str] = (),
             vm: Iterable[str] = ()) -> Filter:
        return cls.from_obj({"paths": list(paths), "kinds": list(kinds), "fs": list(fs), "vm": list(vm)})

    @classmethod
    def from_obj(cls, obj: Any) -> Filter:
        """Validate an untrusted decoded JSON value; FilterError says what is wrong."""
        if obj is None:
            return cls()
        if not isinstance(obj, Mapping):
            raise FilterError("a filter is a JSON object with fields " + ", ".join(FIELDS))
        unknown = set(obj) - set(FIELDS)
        if unknown:
            raise FilterError(f"unknown filter field(s): {', '.join(sorted(map(str, unknown)))[:200]}")
        size = len(json.dumps(obj, separators=(",", ":")))
        if size > MAX_FILTER_BYTES:
            raise FilterError(f"filter too large: {size} bytes of JSON (at most {MAX_FILTER_BYTES})")
        values: dict[str, tuple[str, ...]] = {}
        for name in FIELDS:
            items = obj.get(name) or []
            if isinstance(items, str):
                items = [items]
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise FilterError(f"filter field {name!r} must be a list of strings")
            if len(items) > MAX_ITEMS:
                raise FilterError(f"filter field {name!r} has {len(items)} items (at most {MAX_ITEMS})")
            values[name] = tuple(dict.fromkeys(items))
        for k in values["kinds"]:
            if k not in KINDS:
                raise FilterError(f"unknown kind {k!r} (kinds: {', '.join(KINDS)})")
        globs = []
        for g in values["paths"]:
            if not g.startswith("/"):
                raise FilterError(f"path glob must be absolute (start with /): {g!r}")
            if len(g) > MAX_GLOB_LEN:
                raise FilterError(f"path glob longer than {MAX_GLOB_LEN} characters")
            if g.count("*") > MAX_STARS:
                raise FilterError(f"path glob has more than {MAX_STARS} '*': {g[:80]!r}")
            globs.append(PathGlob(g))
        return cls(paths=values["paths"], kinds=values["kinds"], fs=values["fs"], vm=values["vm"],
                   _globs=tuple(globs))

    @classmethod
    def from_json(cls, text: str | bytes) -> Filter:
        if len(text) > MAX_FILTER_BYTES:
            raise FilterError(f"filter too large: {len(text)} bytes (at most {MAX_FILTER_BYTES})")
        try:
            obj = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FilterError(f"filter is not JSON: {exc}") from None
        return cls.from_obj(obj)

    def to_obj(self) -> dict[str, list[str]]:
        """The compact form: only the fields that restrict."""
        return {name: list(getattr(self, name)) for name in FIELDS if getattr(self, name)}

    def to_json(self) -> str:
        return json.dumps(self.to_obj(), separators=(",", ":"), ensure_ascii=False)

    @property
    def is_all(self) -> bool:
        return not (self.paths or self.kinds or self.fs or self.vm)

    def match_path(self, path: str | None) -> bool:
        return path is not None and any(g.match(path) for g in self._globs)

    def matches(self, ev: Mapping[str, Any] | Any) -> bool:
        """An event (a Mutation or its dict form) passes this filter."""
        get = ev.get if isinstance(ev, Mapping) else (lambda k, _e=ev: getattr(_e, k, None))
        if self.kinds and get("kind") not in self.kinds:
            return False
        if self.fs and get("fs") not in self.fs:
            return False
        if self.vm and get("vm") not in self.vm:
            return False
        if self.paths and not (self.match_path(get("path")) or self.match_path(get("old_path"))):
            return False
        return True

    def prefixes(self) -> tuple[str, ...] | None:
        """The directories outside which no path can match (None: any path can)."""
        if not self.paths:
            return None
        out = {literal_prefix(g) for g in self.paths}
        return None if "" in out else tuple(sorted(out))


def union_prefixes(filters: Iterable[Filter]) -> tuple[str, ...] | None:
    """The directories any of these filters can match in (None: anywhere, or no filters at all)."""
    out: set[str] = set()
    any_filter = False
    for f in filters:
        any_filter = True
        p = f.prefixes()
        if p is None:
            return None
        out.update(p)
    return tuple(sorted(out)) if any_filter else None


def under(path: str, prefixes: Iterable[str]) -> bool:
    """path is one of the prefixes or below one (a prefix "" or "/" holds everything)."""
    return any(not p or p == "/" or path == p or path.startswith(p + "/") for p in prefixes)
