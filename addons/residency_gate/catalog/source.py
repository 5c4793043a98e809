"""YAML files that remember where every value came from.

`residency-gate check` must report `file:line: message` for every problem in a
config or catalog file, so values are loaded together with a map from their
path inside the document to the line they were written on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

type DocPath = tuple[str | int, ...]


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


class _Loader(yaml.SafeLoader):
    """Safe loader that keeps dates as strings (`reviewed: 2026-11-28` is data, not a date)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _walk(
    loader: _Loader, node: yaml.Node, path: DocPath, doc: SourceDoc, problems: list[Problem]
) -> Any:
    doc.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
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
    return loader.construct_object(node, deep=True)


def parse_yaml(text: str, file: str, raw: bytes | None = None) -> SourceDoc:
    """Parse one YAML document; raise InvalidSource with located problems."""
    doc = SourceDoc(file=file, data=None, raw=text.encode() if raw is None else raw)
    problems: list[Problem] = []
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            doc.data = _walk(loader, node, (), doc, problems)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise InvalidSource([Problem(file, line, f"invalid YAML: {e.problem or e}")]) from None
    except yaml.YAMLError as e:
        raise InvalidSource([Problem(file, 1, f"invalid YAML: {e}")]) from None
    finally:
        loader.dispose()
    if problems:
        raise InvalidSource(problems)
    return doc


def load_yaml(path: Path) -> SourceDoc:
    """Read and parse a YAML file; unreadable files are problems too."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidSource([Problem(str(path), 1, f"cannot read: {e}")]) from None
    return parse_yaml(text, str(path), raw)
