"""Reading the policy YAML into plain values while remembering where each value came from.

PyYAML's loaders drop positions and silently let a repeated key win, so the file is
composed into a node tree with yaml.SafeLoader (never an unsafe loader) and converted here:
every value and mapping key keeps its 1-based line, repeated keys are reported, and anything
that is not plain data (unknown tags, recursive aliases, alias bombs) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Final, NoReturn

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from cdc_audit.errors import PolicyError, PolicyProblem

__all__ = ["YamlDocument", "YamlPath", "decode_policy_bytes", "format_path", "read_yaml"]

YamlPath = tuple[str | int, ...]

# A policy is a page or two; the limits only stop pathological input (alias expansion,
# megabytes of generated YAML) from consuming the process.
MAX_POLICY_CHARS: Final = 1_000_000
MAX_NODES: Final = 50_000
MAX_DEPTH: Final = 64

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SCALAR_TYPES = (str, int, float, bool, date, type(None))


@dataclass(frozen=True)
class YamlDocument:
    """Plain data (dict/list/scalars) plus the location of every node, keyed by path."""

    data: object
    value_lines: Mapping[YamlPath, int]
    key_lines: Mapping[YamlPath, int]
    scalar_text: Mapping[YamlPath, str]
    problems: tuple[PolicyProblem, ...] = ()
    # Paths whose value could not be read (bad tag, bad merge): already reported in
    # `problems`, so later checks should not complain about them again.
    unreadable: frozenset[YamlPath] = frozenset()

    def line_of(self, path: YamlPath) -> int | None:
        """Line of the value at `path`, else of the nearest enclosing node that exists."""
        for end in range(len(path), -1, -1):
            line = self.value_lines.get(path[:end])
            if line is not None:
                return line
        return None

    def key_line_of(self, path: YamlPath) -> int | None:
        """Line of the mapping key that introduces `path` (falls back to line_of)."""
        line = self.key_lines.get(path)
        return line if line is not None else self.line_of(path)

    def is_unreadable(self, path: YamlPath) -> bool:
        """Whether `path` or a node enclosing it was already reported as unreadable."""
        return any(path[:end] in self.unreadable for end in range(len(path) + 1))

    def text_of(self, path: YamlPath) -> str | None:
        """The scalar exactly as written in the file (before YAML typing), if it is one."""
        return self.scalar_text.get(path)


def format_path(path: YamlPath) -> str:
    """Dotted display path: tables[1].when, streams.admin.retention, redact['"Email"']."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def decode_policy_bytes(raw: bytes, source: str) -> str:
    """Decode the file as UTF-8 (a leading BOM is allowed); anything else is a PolicyError."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise PolicyError(
            [
                PolicyProblem(
                    source,
                    line,
                    "",
                    f"the file is not valid UTF-8 (byte 0x{raw[error.start]:02x} at offset "
                    f"{error.start}); save it as UTF-8",
                )
            ]
        ) from None


def read_yaml(text: str, source: str) -> YamlDocument:
    """Compose one YAML document and convert it; fatal problems raise PolicyError.

    Fatal: syntax errors, an empty file, more than one document, a top level that is not a
    mapping. Repeated keys and unreadable values are collected in `problems` so they are
    reported together with everything else wrong in the file.
    """
    if len(text) > MAX_POLICY_CHARS:
        _fail(source, 1, f"the file is larger than {MAX_POLICY_CHARS} characters")
    text = text.removeprefix("\ufeff")
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as error:
        _fail_yaml(error, text, source)
    try:
        root = _compose(loader, text, source)
        builder = _Builder(loader, source)
        data = builder.build(root, ())
    finally:
        loader.dispose()
    if builder.fatal:
        raise PolicyError(builder.problems)
    return YamlDocument(
        data=data,
        value_lines=builder.value_lines,
        key_lines=builder.key_lines,
        scalar_text=builder.scalar_text,
        problems=tuple(builder.problems),
        unreadable=frozenset(builder.unreadable),
    )


def _compose(loader: yaml.SafeLoader, text: str, source: str) -> MappingNode:
    """The single document's root node, which must be a plain mapping."""
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as error:
        _fail_yaml(error, text, source)
    except RecursionError:
        _fail(source, None, "invalid YAML: the document is nested too deeply")
    if root is None:
        _fail(source, 1, "the policy file is empty; it needs at least 'version' and 'streams'")
    if not isinstance(root, MappingNode) or root.tag != _MAP_TAG:
        _fail(
            source,
            _line(root),
            "the top level must be a mapping of keys (version: 1, streams: ...), "
            f"found {_node_kind(root)}",
        )
    return root


def _fail_yaml(error: yaml.YAMLError, text: str, source: str) -> NoReturn:
    if isinstance(error, yaml.MarkedYAMLError):
        _fail(source, _mark_line(error), _syntax_message(error))
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1
        shown = f"U+{error.character:04X}" if isinstance(error.character, int) else "?"
        _fail(source, line, f"invalid YAML: the control character {shown} is not allowed")
    _fail(source, None, f"invalid YAML: {error}")


def _fail(source: str, line: int | None, message: str) -> NoReturn:
    raise PolicyError([PolicyProblem(source, line, "", message)])


def _mark_line(error: yaml.MarkedYAMLError) -> int | None:
    mark = error.problem_mark or error.context_mark
    return mark.line + 1 if mark is not None else None


def _syntax_message(error: yaml.MarkedYAMLError) -> str:
    problem = error.problem or "syntax error"
    if "'\\t'" in problem:
        return "invalid YAML: a tab character where YAML needs spaces; indent with spaces"
    if "expected a single document" in (error.context or ""):
        return "the file holds more than one YAML document ('---'); keep a single policy"
    context = f" ({error.context})" if error.context else ""
    return f"invalid YAML: {problem}{context}"


def _tag_message(tag: str) -> str:
    shown = "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml") else tag
    return f"unsupported YAML tag '{shown}'; a policy holds only plain values"


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _node_kind(node: Node) -> str:
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return f"a mapping tagged {node.tag}"
    return f"a single value {node.value!r}" if node.value else "an empty value"


@dataclass
class _Builder:
    """Converts a node tree to plain values, recording lines and repeated keys."""

    loader: yaml.SafeLoader
    source: str
    value_lines: dict[YamlPath, int] = field(default_factory=dict)
    key_lines: dict[YamlPath, int] = field(default_factory=dict)
    scalar_text: dict[YamlPath, str] = field(default_factory=dict)
    problems: list[PolicyProblem] = field(default_factory=list)
    unreadable: set[YamlPath] = field(default_factory=set)
    fatal: bool = False
    _nodes_seen: int = 0
    _open: set[int] = field(default_factory=set)
    _checked_mappings: set[int] = field(default_factory=set)

    def build(self, node: Node, path: YamlPath) -> object:
        if self.fatal:
            return None
        self._nodes_seen += 1
        if self._nodes_seen > MAX_NODES or len(path) > MAX_DEPTH:
            self._stop(node, path, "the document is too large or too deeply nested")
            return None
        if id(node) in self._open:
            self._stop(node, path, "an alias refers to a node that contains it")
            return None
        self.value_lines[path] = _line(node)
        self._open.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            if isinstance(node, SequenceNode):
                return self._sequence(node, path)
            return self._scalar(node, path)
        finally:
            self._open.discard(id(node))

    def _stop(self, node: Node, path: YamlPath, message: str) -> None:
        self.fatal = True
        self.problems.append(PolicyProblem(self.source, _line(node), format_path(path), message))

    def _problem(self, line: int | None, path: YamlPath, message: str) -> None:
        self.problems.append(PolicyProblem(self.source, line, format_path(path), message))

    def _unreadable(self, line: int | None, path: YamlPath, message: str) -> None:
        self.unreadable.add(path)
        self._problem(line, path, message)

    def _mapping(self, node: MappingNode, path: YamlPath) -> dict[str, object] | None:
        if node.tag != _MAP_TAG:
            self._unreadable(_line(node), path, _tag_message(node.tag))
            return None
        if id(node) not in self._checked_mappings:
            self._checked_mappings.add(id(node))
            self._report_repeated_keys(node, path)
        try:
            # Merge keys (<<: *defaults) are folded in the standard way: own keys win.
            self.loader.flatten_mapping(node)
        except yaml.MarkedYAMLError as error:
            self._unreadable(_mark_line(error), path, f"invalid merge key: {error.problem}")
            return None
        except RecursionError:
            self._unreadable(_line(node), path, "a merge key (<<) refers to its own mapping")
            return None
        result: dict[str, object] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self._unreadable(_line(key_node), path, "a key must be a plain name, not a list")
                continue
            key = str(key_node.value)
            self.key_lines[(*path, key)] = _line(key_node)
            result[key] = self.build(value_node, (*path, key))
        return result

    def _report_repeated_keys(self, node: MappingNode, path: YamlPath) -> None:
        first_seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = str(key_node.value)
            if key in first_seen:
                self._problem(
                    _line(key_node),
                    (*path, key),
                    f"duplicate key '{key}' (first on line {first_seen[key]}); "
                    "each key may appear only once in a mapping",
                )
            else:
                first_seen[key] = _line(key_node)

    def _sequence(self, node: SequenceNode, path: YamlPath) -> list[object] | None:
        if node.tag != _SEQ_TAG:
            self._unreadable(_line(node), path, _tag_message(node.tag))
            return None
        return [self.build(item, (*path, index)) for index, item in enumerate(node.value)]

    def _scalar(self, node: Node, path: YamlPath) -> object:
        self.scalar_text[path] = str(node.value)
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as error:
            problem = error.problem or "cannot read this value"
            if "could not determine a constructor" in problem:
                problem = _tag_message(node.tag)
            self._unreadable(_line(node), path, problem)
            return None
        except (ValueError, TypeError, OverflowError, AttributeError, KeyError, IndexError):
            # PyYAML's constructors fail on an explicit tag that does not fit the value in
            # ways of their own: `!!timestamp x` (AttributeError), `!!bool maybe` (KeyError).
            self._unreadable(_line(node), path, f"cannot read {node.value!r} as {node.tag}")
            return None
        if not isinstance(value, _SCALAR_TYPES):
            self._unreadable(_line(node), path, f"unsupported YAML value of type {node.tag}")
            return None
        return value
