"""Config files: YAML into validated objects, every problem on one line with its place.

Theory of operation
-------------------
A config file is read in three passes. Each pass after the first adds to one list of problems
instead of stopping at the first, so that a file with five mistakes is fixed in one round trip:

1. Bytes to text. The file must be UTF-8 (a BOM is tolerated); otherwise the one problem is the
   offending byte, its offset and its line. Nothing else can be said about such a file.

2. Text to values. `yaml.compose()` turns the text into a node tree whose marks hold the line and
   column of every key and value. The composer used here resolves no tags at all, so every scalar
   reaches `_Walker` as the text the user wrote plus its quoting style, and the walker decides what
   it means with rules close to the YAML 1.2 core schema:

       quoted or block scalar            always a string
       ~, null, empty                    None
       true, false (also True, TRUE...)  a bool
       12, -3, +7                        an int (decimal only)
       1.5, .5, 1e3, -2.5E-3             a float (must be finite)
       anything else                     a string

   What YAML 1.1 (PyYAML's `safe_load`) would silently turn into something else is a problem
   instead, with the fix in the message: yes/no/on/off/y/n, octal-looking 0777, 0x/0o/0b numbers,
   sexagesimal 1:30, digit separators 1_000, .inf and .nan. So are duplicate keys (both lines
   named), anchors, aliases, merge keys (<<) and tags: a config needs none of them, and each makes
   "what does this file say" harder to answer. The walker keeps where each top-level key and its
   value are written (`Document`); a syntax error is the one problem that stops this pass early.

3. Values to a model. pydantic validates in strict mode (`true` is not an integer, "5" is not a
   number, 5 is not a string; an int is accepted for a float) with finite floats only, and reports
   every field at once. Each of its errors is reworded here as `key: problem (got value)` and
   placed at the value (at the key for an unknown key, which also gets "did you mean"; nowhere for
   a missing key). A key already reported in pass 2 is not reported again by pydantic.

The problems are sorted by place and joined with newlines into one `ConfigError`, one problem per
line, each line on its own naming the file, line, column, key and problem:

    x.yaml:2:1: brokr: unknown key (did you mean 'broker'?)
    x.yaml: broker: required key is missing

Relative paths in a config file are taken relative to the folder of that file, so that a config
means the same thing whatever the current directory is. Models built in code (`BrokerConfig(...)`)
get the same strict checks, raising pydantic's `ValidationError`; `ConfigModel.validated(dict)`
does the same but raises `ConfigError` with the lines above (without places).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol, Self

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, PrivateAttr, ValidationError
from pydantic_core import ErrorDetails
from yaml.composer import Composer
from yaml.events import AliasEvent, NodeEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader, ReaderError
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from common.errors import ConfigError

# --------------------------------------------------------------------------------- places, problems


class _Mark(Protocol):  # PyYAML has two Mark classes (pure Python and libyaml), alike here
    line: int  # 0-based
    column: int


@dataclass(frozen=True, slots=True)
class Place:
    """Where something is written in a config file (both 1-based, as editors count)."""

    line: int
    column: int

    @staticmethod
    def of(mark: _Mark) -> Place:
        return Place(mark.line + 1, mark.column + 1)

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class Problem:
    text: str  # "key: problem" or a problem of the file as a whole
    place: Place | None = None

    def render(self, source: str) -> str:
        where = f"{source}:{self.place}" if self.place is not None else source
        return f"{where}: {self.text}" if where else self.text

    def order(self) -> tuple[int, int, int]:
        # Placed problems in file order; unplaced ones (missing keys) after them.
        if self.place is None:
            return (1, 0, 0)
        return (0, self.place.line, self.place.column)


def report(problems: list[Problem], source: str) -> str:
    """One line per problem, in file order, duplicates dropped (an alias can show a node twice)."""
    seen: set[Problem] = set()
    lines = []
    for problem in sorted(problems, key=Problem.order):
        if problem not in seen:
            seen.add(problem)
            lines.append(problem.render(source))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- pass 1: bytes


def read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        place = Place(raw.count(b"\n", 0, exc.start) + 1, exc.start - line_start + 1)
        raise ConfigError(
            f"{path}:{place}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None


# --------------------------------------------------------------------------------- pass 2: values

_UNTAGGED = "!zswarm-untagged"  # what the composer gives a node written without a tag

_NULL = re.compile(r"~|null|Null|NULL|")
_TRUE = re.compile(r"true|True|TRUE")
_FALSE = re.compile(r"false|False|FALSE")
_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
# YAML 1.1 readings refused below, each because PyYAML (and many other tools) would silently turn
# the text into something the writer may not have meant.
_YAML11_BOOL = re.compile(r"y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF")
_LEADING_ZERO = re.compile(r"[-+]?0[0-9]+")
_RADIX = re.compile(r"[-+]?0([xX][0-9a-fA-F_]+|[oO][0-7_]+|[bB][01_]+)")
_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?")
_INF_NAN = re.compile(r"[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")


def resolve_plain(text: str) -> Any:
    """The value of an unquoted scalar; ValueError (the message says what to write) if ambiguous."""
    if _NULL.fullmatch(text):
        return None
    if _TRUE.fullmatch(text):
        return True
    if _FALSE.fullmatch(text):
        return False
    quote = f"or quote it ('{text}') for text"
    if _INT.fullmatch(text):
        return int(text)
    if _LEADING_ZERO.fullmatch(text):  # before _FLOAT, which would take it for a decimal
        raise ValueError(
            f"{text} is octal in YAML 1.1 (leading zero): write {int(text, 10)} for the decimal, {quote}"
        )
    if _FLOAT.fullmatch(text):
        number = float(text)
        if not math.isfinite(number):
            raise ValueError(f"{text} is too large for a number")
        return number
    if _YAML11_BOOL.fullmatch(text):
        raise ValueError(f"{text} is a boolean in YAML 1.1: write true or false, {quote}")
    if _RADIX.fullmatch(text):
        try:
            decimal = f" ({int(text.replace('_', ''), 0)})"
        except ValueError:  # "0x_" and the like: no number at all
            decimal = ""
        raise ValueError(f"{text}: write numbers in decimal{decimal}, {quote}")
    if _SEXAGESIMAL.fullmatch(text):
        raise ValueError(f"{text} is a base-60 number in YAML 1.1: write the number in decimal, {quote}")
    if _INF_NAN.fullmatch(text):
        raise ValueError(f"{text}: numbers must be finite")
    if "_" in text and (_INT.fullmatch(text.replace("_", "")) or _FLOAT.fullmatch(text.replace("_", ""))):
        raise ValueError(f"{text} is a number in YAML 1.1: write {text.replace('_', '')}, {quote}")
    return text


class _Composer(Reader, Scanner, Parser, Composer, BaseResolver):
    """PyYAML's composer with no tag resolution, and anchors and aliases noted as problems."""

    def __init__(self, text: str) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        BaseResolver.__init__(self)
        self.problems: list[Problem] = []

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        # Tags are decided by _Walker from the text and the quoting style, not by YAML 1.1 rules.
        return _UNTAGGED

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
        if isinstance(event, AliasEvent):
            self.problems.append(
                Problem(f"aliases (*{event.anchor}) are not accepted: write the value out", _at(event))
            )
        elif isinstance(event, NodeEvent) and event.anchor is not None:
            self.problems.append(
                Problem(f"anchors (&{event.anchor}) are not accepted: write the value out", _at(event))
            )
        return super().compose_node(parent, index)


def _at(event: NodeEvent) -> Place | None:
    return Place.of(event.start_mark) if event.start_mark is not None else None


def _node_place(node: Node) -> Place:
    return Place.of(node.start_mark)


@dataclass
class Document:
    """A config file's top-level mapping, with where each key and value is written."""

    data: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, Place] = field(default_factory=dict)
    values: dict[str, Place] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # Keys whose value already has a problem above: pydantic's view of them would only repeat it.
    reported: set[str] = field(default_factory=set)


def parse(text: str, source: str) -> Document:
    """Pass 2: the top-level mapping of a config text. ConfigError only for a syntax error."""
    try:
        composer = _Composer(text)
        root = composer.get_single_node()
    except ReaderError as exc:  # a control character: raised before any mark exists
        position = int(exc.position)
        line_start = text.rfind("\n", 0, position) + 1
        place = Place(text.count("\n", 0, position) + 1, position - line_start + 1)
        raise ConfigError(
            f"{source}:{place}: character #x{exc.character:04x} is not allowed in YAML"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{Place.of(mark)}" if mark is not None else source
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            context_line = f" at line {exc.context_mark.line + 1}" if exc.context_mark is not None else ""
            problem += f" ({exc.context}{context_line})"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {' '.join(str(exc).split())}") from None
    document = Document(problems=list(composer.problems))
    if root is None:
        return document  # an empty file: every key takes its default
    if not isinstance(root, MappingNode):
        raise ConfigError(
            f"{source}:{_node_place(root)}: expected a mapping of keys to values at the top level"
        )
    _Walker(document).top(root)
    return document


class _Walker:
    """Turns composed nodes into Python values, adding a Problem for each thing it refuses."""

    def __init__(self, document: Document) -> None:
        self.document = document

    def refuse(self, key: str, text: str, place: Place) -> None:
        self.document.problems.append(Problem(f"{key}: {text}" if key else text, place))
        if key:
            self.document.reported.add(key)

    def top(self, root: MappingNode) -> None:
        doc = self.document
        self.check_tag(root, "")
        for key_node, value_node in root.value:
            key = self.key(key_node, "")
            if key is None:
                continue
            if key in doc.keys:
                doc.problems.append(
                    Problem(
                        f"duplicate key '{key}' (first at line {doc.keys[key].line})", _node_place(key_node)
                    )
                )
                continue  # the first one is validated; one error is enough for the second
            doc.keys[key] = _node_place(key_node)
            doc.values[key] = _node_place(value_node)
            doc.data[key] = self.value(value_node, key)

    def key(self, node: Node, within: str) -> str | None:
        """A mapping key as a name, or None (a problem noted) if it cannot be one."""
        where = _node_place(node)
        if not isinstance(node, ScalarNode):
            kind = "a mapping" if isinstance(node, MappingNode) else "a list"
            self.refuse(within, f"a key must be a name, not {kind}", where)
            return None
        self.check_tag(node, within)
        text = str(node.value)
        if text == "<<" and node.style is None:
            self.refuse(within, "merge keys (<<) are not accepted: write the keys out", where)
            return None
        return text

    def value(self, node: Node, key: str) -> Any:
        self.check_tag(node, key)
        if isinstance(node, MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                name = self.key(key_node, key)
                if name is not None:
                    out[name] = self.value(value_node, key)
            return out
        if isinstance(node, SequenceNode):
            return [self.value(item, key) for item in node.value]
        text = str(node.value)
        if isinstance(node, ScalarNode) and node.style is None:
            try:
                return resolve_plain(text)
            except ValueError as exc:
                self.refuse(key, str(exc), _node_place(node))
        return text  # quoted and block scalars are strings, whatever they look like

    def check_tag(self, node: Node, key: str) -> None:
        if node.tag != _UNTAGGED:
            shown = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.refuse(key, f"tags ({shown}) are not accepted: write the value plainly", _node_place(node))


# ---------------------------------------------------------------------------------- pass 3: model

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _upper_level(value: object) -> object:
    # Case-insensitive on input, stored as logging spells it; anything else is left for the
    # Literal to refuse with the list of valid levels.
    if isinstance(value, str) and value.upper() in LOG_LEVELS:
        return value.upper()
    return value


LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper_level)]


def _running_as_root() -> bool:
    return os.name == "posix" and os.geteuid() == 0


def _can_create_in(folder: Path) -> str | None:
    """None if a folder can be created in `folder`, else why not."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable"
    if _running_as_root():
        # access() says yes to root for any folder on a writable mount, /proc and /sys included:
        # only trying tells. The probe is removed at once, where the real folder will appear anyway.
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".zswarm-probe-", dir=folder))
        except OSError:
            return f"{folder} does not accept new folders"
    return None


def check_folder(value: str) -> str:
    """`value` unchanged if it is a folder or could be created as one; ValueError saying why not.

    Creatable means: the nearest existing ancestor is a folder this process can create folders in.
    The folder itself is not created: loading a config has no side effects worth undoing."""
    path = Path(value)
    try:
        if os.path.lexists(path):  # lexists: a dangling symlink exists too, and blocks mkdir
            if not path.is_dir():
                raise ValueError(f"{value} exists and is not a folder")
            if not os.access(path, os.W_OK | os.X_OK):
                raise ValueError(f"{value} is a folder this process cannot write to")
            return value
        ancestor = path.absolute().parent
        while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ValueError(f"{value} cannot be created: {ancestor} is not a folder")
        why = _can_create_in(ancestor)
        if why is not None:
            raise ValueError(f"{value} cannot be created: {why}")
    except OSError as exc:
        raise ValueError(f"{value} cannot be checked: {exc.strerror or exc}") from None
    return value


def check_secret_key_file(value: str | None) -> str | None:
    """A node's own CURVE secret key file (authenticated mode): it must load; None: plain mode."""
    if value is not None:
        from common.security import load_secret

        try:
            load_secret(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    return value


def check_with_secret_key(value: str | None, data: dict[str, Any], what: str, own_key: str) -> bool:
    """A field that goes with `secret_key_file` (both or neither). `what` says what the field
    holds (for the error when it is missing), `own_key` what the secret key is. Returns True when
    the field is set and is to be checked further; raises ValueError for a half configuration."""
    has_secret = data.get("secret_key_file") is not None
    if value is None:
        if has_secret:
            raise ValueError(f"required with secret_key_file ({what})")
        return False
    if not has_secret and "secret_key_file" in data:
        raise ValueError(f"needs secret_key_file too ({own_key})")
    return True


def check_allow_dir(value: str | None, data: dict[str, Any], what: str, own_key: str) -> str | None:
    """The allow-list folder of authenticated mode (see `check_with_secret_key`)."""
    if check_with_secret_key(value, data, what, own_key) and not os.path.isdir(str(value)):
        raise ValueError(f"{value} is not a folder")
    return value


class ConfigModel(BaseModel):
    # strict: YAML values arrive with their real types (pass 2), so no coercion is needed, and
    # coercion would hide mistakes ("5" or true for a port). Floats accept ints even so.
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False
    )

    # Fields holding filesystem paths, resolved against the config file's folder.
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()
    # What a valid value looks like, for fields whose pydantic message would show a regex.
    HINTS: ClassVar[dict[str, str]] = {}

    # Where the config came from, for checks made after loading (BrokerConfig.check_share_dir).
    _source: str = PrivateAttr(default="")
    _values: dict[str, Place] = PrivateAttr(default_factory=dict)

    def problem_line(self, key: str, text: str) -> str:
        """`file:line:column: key: text`, for a problem with `key` found after loading."""
        return Problem(f"{key}: {text}", self._values.get(key)).render(self._source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        path = Path(path)
        document = parse(read_text(path), str(path))
        base = path.resolve().parent
        for key in cls.PATH_FIELDS:
            value = document.data.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                document.data[key] = os.path.normpath(base / value)
        return cls._build(document, str(path))

    @classmethod
    def validated(cls, data: dict[str, Any], source: str = "config") -> Self:
        return cls._build(Document(data=dict(data)), source)

    @classmethod
    def _build(cls, document: Document, source: str) -> Self:
        problems = list(document.problems)
        model: Self | None = None
        try:
            model = cls.model_validate(document.data)
        except ValidationError as exc:
            problems += cls._problems(exc, document)
        if problems or model is None:
            raise ConfigError(report(problems, source))
        model._source = source
        model._values = dict(document.values)
        return model

    @classmethod
    def _problems(cls, exc: ValidationError, document: Document) -> list[Problem]:
        out: list[Problem] = []
        done: set[str] = set(document.reported)
        for err in exc.errors(include_url=False):
            loc = err["loc"]
            top = str(loc[0]) if loc else ""
            if top in done:
                continue  # one line per key: a union or a duplicate report adds nothing
            done.add(top)
            key = ".".join(str(p) for p in loc) or "(top level)"
            text, at_key = cls._describe(err, key, document.data.get(top))
            place = (document.keys if at_key else document.values).get(top)
            out.append(Problem(text, place))
        return out

    @classmethod
    def _describe(cls, err: ErrorDetails, key: str, given: Any) -> tuple[str, bool]:
        """`key: problem (got value)`, and whether it belongs at the key rather than the value."""
        kind = err["type"]
        ctx: dict[str, Any] = dict(err.get("ctx") or {})
        if kind == "extra_forbidden":
            close = suggest(key, list(cls.model_fields))
            return f"{key}: unknown key" + (f" (did you mean '{close}'?)" if close else ""), True
        if kind == "missing":
            return f"{key}: required key is missing", True
        if kind == "int_type":
            problem = "expected an integer"
        elif kind == "float_type":
            problem = "expected a number"
        elif kind == "string_type":
            if isinstance(given, bool | int | float):
                return (
                    f"{key}: expected a string (got {_show(given)}: quote it if it is meant as text)",
                    False,
                )
            problem = "expected a string"
        elif kind == "finite_number":
            problem = "must be a finite number"
        elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            word = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
            bound = next(iter(ctx))
            problem = f"must be {word[bound]} {ctx[bound]}"
        elif kind == "string_too_short":
            n = ctx.get("min_length", 1)
            problem = "must not be empty" if n == 1 else f"must be at least {n} characters"
        elif kind == "string_too_long":
            problem = f"must be at most {ctx.get('max_length')} characters"
        elif kind == "string_pattern_mismatch":
            problem = cls.HINTS.get(key) or f"must match {ctx.get('pattern')}"
        elif kind == "literal_error":
            problem = f"must be {ctx.get('expected')}"
        elif kind in ("value_error", "assertion_error"):
            problem = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
            return f"{key}: {problem}", False  # these messages name the value themselves
        else:
            problem = str(err["msg"]).replace("Input should be", "must be")
        return f"{key}: {problem} (got {_show(given)})", False


def suggest(key: str, names: list[str]) -> str | None:
    """The name `key` was probably meant to be: a close spelling, else the one name containing it."""
    wanted = key.lower().replace("-", "_").strip()
    close = difflib.get_close_matches(wanted, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    containing = [name for name in names if len(wanted) >= 3 and wanted in name]
    return containing[0] if len(containing) == 1 else None


def _show(value: Any) -> str:
    """A value as it would be written in YAML, shortened."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        shown = repr(value if len(value) <= 60 else value[:57] + "...")
        return f"the text {shown}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
