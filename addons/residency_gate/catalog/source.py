"""YAML files that remember where every value came from, read within fixed bounds.

`residency-gate check` must report `file:line: message` for every problem in a
config or catalog file, so values are loaded together with a map from their
path inside the document to the line they were written on.

A config file is input a running proxy re-reads on every change, so reading one is
bounded before the cost is paid: at most MAX_SOURCE_BYTES, MAX_DEPTH levels of nesting
and MAX_NODES values; no anchors or aliases (a 370-byte "billion laughs" expands to
gigabytes), no explicit tags (`!!int xyz`, `!!python/...`). Every way a file can be
unreadable is a located Problem, never a traceback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

type DocPath = tuple[str | int, ...]

MAX_SOURCE_BYTES = 1 << 20  # the shipped catalog's largest file is 24 KiB
MAX_DEPTH = 64  # nesting levels; the shipped files use at most 8
MAX_NODES = 20_000  # values in one document; regions.yaml has about 2300


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a file, located for a human."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class InvalidSource(Exception):
    """Raised with every problem found, never just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass
class SourceDoc:
    """A parsed YAML document plus the line of every value in it."""

    file: str
    data: Any
    lines: dict[DocPath, int] = field(default_factory=dict)
    raw: bytes = b""  # the bytes parsed: revisions hash exactly what was read

    def line(self, path: DocPath) -> int:
        """Line of the value at `path`, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)

    def problem(self, path: DocPath, message: str) -> Problem:
        return Problem(self.file, self.line(path), message)


try:  # libyaml scans and parses (9x faster, no recursion); composing stays ours
    from yaml._yaml import CParser as _Parser

    class _Events(_Parser):
        def __init__(self, stream: str) -> None:
            _Parser.__init__(self, stream)
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    class _Events(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)


class _Loader(yaml.composer.Composer, _Events, yaml.constructor.SafeConstructor,
              yaml.resolver.Resolver):
    """Safe loader that keeps dates as strings (`reviewed: 2026-11-28` is data, not a date)
    and refuses what a config never needs but an attacker would use: anchors and aliases,
    explicit tags, nesting beyond MAX_DEPTH, more than MAX_NODES values."""

    def __init__(self, stream: str) -> None:
        _Events.__init__(self, stream)  # checks every character: NUL and control bytes fail
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        mark = event.start_mark
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed; write the "
                "value out", mark)
        if getattr(event, "tag", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, f"explicit tags ({_short(event.tag)}) are not allowed; quote a string "
                "instead", mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"more than {MAX_NODES} values in one file", mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _short(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


def _construct(loader: _Loader, node: yaml.Node, file: str) -> Any:
    """A scalar (or a key) as Python; a value YAML cannot represent is a located problem."""
    try:
        value = loader.construct_object(node, deep=True)
    except (ValueError, OverflowError) as e:  # a 5000-digit integer, ...
        raise InvalidSource([Problem(file, node.start_mark.line + 1,
                                     f"cannot read value {_excerpt(node)}: {e}")]) from None
    if isinstance(value, float) and not math.isfinite(value):  # .nan passes every bound check
        raise InvalidSource([Problem(file, node.start_mark.line + 1,
                                     f"{_excerpt(node)} is not a finite number")])
    if isinstance(value, int) and value.bit_length() > 64:  # 0xfff... has no digit limit
        raise InvalidSource([Problem(file, node.start_mark.line + 1,
                                     f"{_excerpt(node)} is too large a number")])
    return value


def _excerpt(node: yaml.Node) -> str:
    value = node.value if isinstance(node, yaml.ScalarNode) else f"<{node.id}>"
    return repr(value[:40] + "..." if len(value) > 40 else value)


def _walk(
    loader: _Loader, node: yaml.Node, path: DocPath, doc: SourceDoc, problems: list[Problem]
) -> Any:
    doc.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _construct(loader, key_node, doc.file)
            if not isinstance(key, str):
                # `no:` is YAML 1.1 for False: a classic trap with country codes.
                problems.append(
                    Problem(
                        doc.file,
                        key_node.start_mark.line + 1,
                        f"key {key_node.value!r} is read as {type(key).__name__} {key!r}; quote it",
                    )
                )
                key = str(key_node.value)
            if key in out:
                problems.append(
                    Problem(doc.file, key_node.start_mark.line + 1, f"duplicate key {key!r}")
                )
            out[key] = _walk(loader, value_node, (*path, key), doc, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(loader, item, (*path, i), doc, problems) for i, item in enumerate(node.value)]
    return _construct(loader, node, doc.file)


def parse_yaml(text: str, file: str, raw: bytes | None = None) -> SourceDoc:
    """Parse one YAML document; raise InvalidSource with located problems."""
    doc = SourceDoc(file=file, data=None, raw=text.encode(errors="replace") if raw is None else raw)
    if len(text) > MAX_SOURCE_BYTES:
        raise InvalidSource([Problem(file, 1, f"larger than {MAX_SOURCE_BYTES} bytes")])
    problems: list[Problem] = []
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is not None:
            doc.data = _walk(loader, node, (), doc, problems)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise InvalidSource([Problem(file, line, f"invalid YAML: {e.problem or e}")]) from None
    except yaml.reader.ReaderError as e:
        bad = chr(e.character) if isinstance(e.character, int) else None
        line = text.count("\n", 0, max(text.find(bad), 0)) + 1 if bad else 1
        what = f"character {e.character:#06x}" if bad else "byte"
        raise InvalidSource([Problem(file, line, f"invalid YAML: {what} not allowed "
                                                 f"({e.reason})")]) from None
    except yaml.YAMLError as e:
        raise InvalidSource([Problem(file, 1, f"invalid YAML: {e}")]) from None
    except RecursionError:  # belt and braces: MAX_DEPTH stops nesting long before this
        raise InvalidSource([Problem(file, 1, "invalid YAML: nested too deeply")]) from None
    finally:
        if loader is not None:
            loader.dispose()  # type: ignore[attr-defined]
    if problems:
        raise InvalidSource(problems)
    return doc


def load_yaml(path: Path) -> SourceDoc:
    """Read and parse a YAML file; unreadable files are problems too."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SOURCE_BYTES + 1)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise InvalidSource([Problem(str(path), 1, f"cannot read: {e}")]) from None
    if len(raw) > MAX_SOURCE_BYTES:
        raise InvalidSource([Problem(str(path), 1, f"larger than {MAX_SOURCE_BYTES} bytes")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InvalidSource([Problem(str(path), line, f"not UTF-8 text: {e.reason} at byte "
                                                      f"{e.start}")]) from None
    return parse_yaml(text, str(path), raw)
