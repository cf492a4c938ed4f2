"""Safe YAML loading that remembers where every key and value came from (for error messages).

``load_with_lines(path)`` returns the plain Python data plus a map from key paths (tuples of mapping
keys and list indices) to 1-based line numbers, built from PyYAML's node marks. Duplicate keys —
which PyYAML silently collapses — are reported with their line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tuner.errors import UserError


class LocatedError(UserError):
    """A problem in a user file, reported as ``file:line: message`` on one line."""


class Located:
    """Data of one YAML file plus its line map; :meth:`error` builds a :class:`LocatedError`."""

    def __init__(self, path: Path, data: Any, lines: dict[tuple, int]):
        self.path, self.data, self.lines = path, data, lines

    def line(self, where: tuple) -> int:
        """Line of ``where`` or of its closest ancestor that has one (1 for the document)."""
        while where and where not in self.lines:
            where = where[:-1]
        return self.lines.get(where, 1)

    def error(self, where: tuple, message: str) -> LocatedError:
        dotted = ".".join(str(p) for p in where)
        prefix = f"{dotted}: " if dotted else ""
        return LocatedError(f"{self.path}:{self.line(where)}: {prefix}{message}")


def _walk(node: Any, where: tuple, lines: dict[tuple, int], located_path: Path) -> None:
    import yaml

    lines.setdefault(where, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in where + (key,))
                raise LocatedError(f"{located_path}:{line}: {dotted}: duplicate key (first at line {seen[key]})")
            seen[key] = line
            lines[where + (key,)] = line
            _walk(value_node, where + (key,), lines, located_path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[where + (i,)] = item.start_mark.line + 1
            _walk(item, where + (i,), lines, located_path)


def load_with_lines(path: str | Path) -> Located:
    """Parse ``path`` with the safe loader; syntax errors become ``file:line: problem`` UserErrors."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read search space {path}: {exc.strerror or exc}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LocatedError(f"{path}:{line}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines, path)
    return Located(path, data, lines)
