"""Safe YAML loading that remembers where every key and value came from (for error messages).

``load_with_lines(path)`` returns the plain Python data plus a map from key paths (tuples of mapping
keys and list indices) to 1-based line numbers, built from PyYAML's node marks. Duplicate keys —
which PyYAML silently collapses — are reported with their line.

The file is user input, so loading is bounded before any work is done: at most
:data:`MAX_FILE_BYTES` are read, nesting is at most :data:`MAX_DEPTH` and a document has at most
:data:`MAX_NODES` nodes. YAML aliases (``*name``, also in ``<<: *name`` merges) are refused outright
when they are composed, before anything is expanded: space files have no use for them (the format
is small and flat and the shipped files use none), an alias would share one node between several
places of the line map, and nested aliases expand exponentially ("billion laughs": a few hundred
bytes that construct gigabytes). Refusing them costs nothing and needs no expansion budget.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tuner.errors import UserError

# 256 KiB: the shipped space files are ~1-2 KB, and the pure-Python parser reads ~1 MB/s (1 MiB of
# newlines takes over a second on a slow core; 256 KiB a quarter of that)
MAX_FILE_BYTES = 256 << 10
MAX_NODES = 10_000  # YAML nodes (scalars, lists, mappings) in one document; shipped files have < 200
MAX_DEPTH = 32  # nesting of lists/mappings; a space file needs 5 or 6 levels


class LocatedError(UserError):
    """A problem in a user file, reported as ``file:line: message`` on one line."""


class Located:
    """Data of one YAML file plus its line map; :meth:`error` builds a :class:`LocatedError`."""

    def __init__(self, path: Path, data: Any, lines: dict[tuple, int], raw: bytes = b""):
        self.path, self.data, self.lines, self.raw = path, data, lines, raw

    def line(self, where: tuple) -> int:
        """Line of ``where`` or of its closest ancestor that has one (1 for the document)."""
        while where and where not in self.lines:
            where = where[:-1]
        return self.lines.get(where, 1)

    def error(self, where: tuple, message: str) -> LocatedError:
        dotted = _dotted(where)
        prefix = f"{dotted}: " if dotted else ""
        return LocatedError(f"{self.path}:{self.line(where)}: {prefix}{message}")


def _dotted(where: tuple) -> str:
    """``families.ams.params.window`` for messages: keys with line breaks (or very long ones) are quoted
    and cut, so that a message stays one readable line."""
    parts = []
    for p in where:
        text = str(p)
        if len(text) > 60:
            text = text[:57] + "..."
        parts.append(text if text.isprintable() else repr(text))
    return ".".join(parts)


def _walk(node: Any, where: tuple, lines: dict[tuple, int], located_path: Path) -> None:
    import yaml

    lines.setdefault(where, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = _dotted(where + (key,))
                raise LocatedError(f"{located_path}:{line}: {dotted}: duplicate key "
                                   f"(first at line {seen[key]})")
            seen[key] = line
            lines[where + (key,)] = line
            _walk(value_node, where + (key,), lines, located_path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[where + (i,)] = item.start_mark.line + 1
            _walk(item, where + (i,), lines, located_path)


class _Limit(Exception):
    """Raised inside the composer when a bound is hit (``line`` is 1-based)."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message


_LOADER = None


def _bounded_loader():
    """A SafeLoader that refuses aliases and bounds node count and depth while composing."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml

    class BoundedSafeLoader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self._nodes = 0
            self._depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise _Limit(event.start_mark.line + 1,
                             f"YAML aliases (*{event.anchor}) are not allowed in search-space files; "
                             f"write the value out in full")
            self._nodes += 1
            if self._nodes > MAX_NODES:
                raise _Limit(self.peek_event().start_mark.line + 1,
                             f"more than {MAX_NODES} YAML nodes (the limit for search-space files); "
                             f"split the space or make it smaller")
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH:
                    raise _Limit(self.peek_event().start_mark.line + 1,
                                 f"YAML nested more than {MAX_DEPTH} levels deep (the limit for search-space "
                                 f"files); flatten it")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_object(self, node, deep=False):
            try:
                return super().construct_object(node, deep)
            except (ValueError, OverflowError) as exc:  # e.g. an int of more than 4300 digits, a bad date
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                raise _Limit(node.start_mark.line + 1, f"invalid YAML value ({reason}); fix it") from None

    _LOADER = BoundedSafeLoader
    return _LOADER


def _read_bounded(path: Path) -> bytes:
    """At most :data:`MAX_FILE_BYTES` of ``path`` (a larger file is refused before it is parsed)."""
    try:
        size = path.stat().st_size
        if size <= MAX_FILE_BYTES:
            with path.open("rb") as fh:
                raw = fh.read(MAX_FILE_BYTES + 1)
            size = len(raw)
    except OSError as exc:
        raise UserError(f"cannot read search space {path}: {exc.strerror or exc}") from None
    if size > MAX_FILE_BYTES:
        raise LocatedError(f"{path}:1: the file is {size} bytes, over the {MAX_FILE_BYTES} byte "
                           f"({MAX_FILE_BYTES >> 10} KiB) limit for search-space files; make it smaller")
    return raw


def load_with_lines(path: str | Path) -> Located:
    """Parse ``path`` with the safe loader; syntax errors become ``file:line: problem`` UserErrors.

    The raw bytes read are kept as ``Located.raw`` (for digests: the file is read once).
    """
    import yaml

    path = Path(path)
    raw = _read_bounded(path)
    loader = None
    try:
        loader = _bounded_loader()(raw)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _Limit as exc:
        raise LocatedError(f"{path}:{exc.line}: {exc.message}") from None
    except yaml.reader.ReaderError as exc:  # not UTF-8/16 text, or a control character
        line = raw[:exc.position].count(b"\n") + 1 if isinstance(exc.position, int) else 1
        raise LocatedError(f"{path}:{line}: invalid YAML: {exc.reason} (character #x{exc.character:04x}); "
                           f"remove it or save the file as UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LocatedError(f"{path}:{line}: invalid YAML: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines, path)
    return Located(path, data, lines, raw)
