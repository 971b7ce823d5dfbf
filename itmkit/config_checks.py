"""Every config field checked by name, type and range, from the dataclass annotations.

A field's annotation says what it accepts: the type (``int``, ``float``, ``bool``, ``str``,
``Literal[...]``, ``X | None``, ``tuple[int, ...]``, a nested dataclass) and, through
``typing.Annotated``, a :class:`Range` (numbers), :class:`OneOf` (names with aliases) or
:class:`Matches` (free text of a given form)::

    epochs: PositiveInt = 25                         # an int >= 1
    region_drop: Fraction = 0.2                      # a float in [0, 1)
    dev_max_captions: Annotated[int, Range(5, multiple_of=5)] | None = 5000

Two entry points:

- :func:`parse_value` turns one override (text from ``--set`` or a notebook, or a Python
  value) into the field's type: ``"3"`` -> 3, ``"yes"`` -> True, ``"15,20"`` -> (15, 20),
  ``"null"`` -> None for optional fields.
- :func:`check_config` checks a whole (nested) config as built, exact types only, then runs each
  dataclass's own cross-field checks (``__post_init__``).

Both raise :class:`ConfigError` naming the dotted key, what was expected and what was found.

Our design choice (issue 14 §3): these checks are written by hand rather than taken from
OmegaConf's structured configs. OmegaConf 2.4 checks the *type* of a dotted override against the
same annotations (``Literal`` and unions included) but has no ranges, so ``train.epochs=0`` or
``train.lr=-3`` pass; a second hand-written layer would be needed anyway, behind a second object
model (``DictConfig`` -> ``to_object``) and two new dependencies. One walk over the annotations
does both, with one message format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")
NULL_WORDS = ("null", "none")


class ConfigError(ValueError):
    """A config value that does not fit its field.

    Attributes:
        key: the dotted field name (``"train.epochs"``).
        expected: what the field accepts, in words.
        found: the value given, as ``repr``.
    """

    def __init__(self, key: str, expected: str, found: Any) -> None:
        self.key, self.expected, self.found = key, expected, found
        super().__init__(f"{key}: expected {expected}, found {found!r}")

    def __reduce__(self):
        return (type(self), (self.key, self.expected, self.found))


@dataclass(frozen=True)
class Range:
    """The allowed interval of a number field; always finite. ``low``/``high`` None: unbounded.

    ``low_open``/``high_open`` exclude the bound; ``multiple_of`` asks for a multiple;
    ``why`` is added to the message (the reason for a bound that is not obvious).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    multiple_of: int | None = None
    why: str = ""

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return self.multiple_of is None or value % self.multiple_of == 0

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
        text = " and ".join(parts) if parts else "finite"
        if self.multiple_of is not None:
            text += f", a multiple of {self.multiple_of}"
        return text + (f" ({self.why})" if self.why else "")


@dataclass(frozen=True)
class OneOf:
    """A name from ``choices``; ``aliases`` maps other accepted spellings to a choice."""

    choices: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...] = ()

    def accepts(self, value: str) -> bool:
        return value in self.choices or value in dict(self.aliases)


@dataclass(frozen=True)
class Matches:
    """Free text matching ``pattern`` (full match), described to the user as ``description``."""

    pattern: str
    description: str


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


# Field types shared by the config dataclasses (itmkit.config and every method's config).
PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
FiniteFloat = Annotated[float, Range()]
Fraction = Annotated[float, Range(0, 1, high_open=True)]  # dropout-like rates: 1 would drop everything
Seed = Annotated[int, Range(0, 2**32 - 1)]  # NumPy's legacy seeding takes 32 bits
NonEmptyText = Annotated[str, Matches(r"\S(.*\S)?", "a non-empty string")]
PathText = Annotated[str, Matches(r".*\S.*", "a path (non-empty)")]
DeviceName = Annotated[str, Matches(r"auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?", "auto, cpu, cuda, cuda:N or mps")]


# --- reading annotations -------------------------------------------------------------------
def field_hints(cls: type) -> dict[str, Any]:
    """``{field name: annotation}`` of a dataclass, ``Annotated`` metadata kept."""
    return typing.get_type_hints(cls, include_extras=True)


def _unwrap(hint: Any) -> tuple[Any, tuple]:
    """``Annotated[T, m...]`` -> ``(T, (m...))``; anything else -> ``(hint, ())``."""
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        return base, tuple(meta)
    return hint, ()


def _optional_member(hint: Any) -> Any | None:
    """``X | None`` -> ``X``; ``None`` when ``hint`` is not optional."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) == 1 and len(typing.get_args(hint)) == 2:
            return members[0]
    return None


def describe(hint: Any) -> str:
    """What a field accepts, in words: ``"an integer >= 1"``, ``"one of 'adamw', 'adam'"``."""
    optional = _optional_member(hint)
    if optional is not None:
        return f"{describe(optional)}, or null"
    base, meta = _unwrap(hint)
    for m in meta:
        if isinstance(m, OneOf):
            return "one of " + ", ".join(repr(c) for c in m.choices)
        if isinstance(m, Matches):
            return m.description
    limits = next((m for m in meta if isinstance(m, Range)), None)
    tail = f" {limits.describe()}" if limits is not None and limits.describe() != "finite" else ""
    if base is bool:
        return "true or false (also 1/0, yes/no)"
    if base is int:
        return f"an integer{tail}"
    if base is float:
        return f"a finite number{tail}"
    if base is str:
        return "a string"
    if typing.get_origin(base) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(base))
    if typing.get_origin(base) is tuple:
        return f"a list of {_plural(describe(typing.get_args(base)[0]))}, e.g. [15, 20]"
    if dataclasses.is_dataclass(base):
        return f"a {base.__name__}"
    return "any value"


def _plural(text: str) -> str:
    return re.sub(r"^an? (\w+)", r"\1s", text)


# --- one value ------------------------------------------------------------------------------
def parse_value(key: str, value: Any, hint: Any) -> Any:
    """``value`` (text from a command line or notebook, or a Python value) as the type ``hint``
    describes, range checked. Text is read by the field's type: ``"3"`` for an int field is 3,
    ``"yes"`` for a bool field is True, ``"15,20"`` or ``"[15, 20]"`` for a tuple field is
    ``(15, 20)``, ``"null"``/``"none"`` for an optional field is None."""
    return _value(key, value, hint, from_text=True)


def _value(key: str, value: Any, hint: Any, from_text: bool) -> Any:
    optional = _optional_member(hint)
    if optional is not None:
        if value is None or (from_text and isinstance(value, str) and value.strip().lower() in NULL_WORDS):
            return None
        try:
            return _value(key, value, optional, from_text)
        except ConfigError as err:
            raise ConfigError(err.key, describe(hint) if err.key == key else err.expected, err.found) from None
    base, meta = _unwrap(hint)
    expected = describe(hint)
    if base is Any or base is typing.Any:
        if from_text and isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if base is bool:
        return _bool(key, value, expected, from_text)
    if base is int:
        result = _int(key, value, expected, from_text)
    elif base is float:
        result = _float(key, value, expected, from_text)
    elif base is str or typing.get_origin(base) is Literal:
        if not isinstance(value, str):
            raise ConfigError(key, expected, value)
        if typing.get_origin(base) is Literal and value not in typing.get_args(base):
            raise ConfigError(key, expected, value)
        result = value
    elif typing.get_origin(base) is tuple:
        return _tuple(key, value, base, expected, from_text)
    elif dataclasses.is_dataclass(base):
        if not isinstance(value, base):
            raise ConfigError(key, f"{expected} (set its fields one by one: {key}.<field>=...)", value)
        return value
    else:  # an annotation this checker does not know: leave the value alone
        return value
    for m in meta:
        if isinstance(m, Range) and not m.contains(result):
            raise ConfigError(key, expected, value)
        if isinstance(m, OneOf) and not m.accepts(result):
            raise ConfigError(key, expected, value)
        if isinstance(m, Matches) and not re.fullmatch(m.pattern, result):
            raise ConfigError(key, expected, value)
    return result


def _bool(key: str, value: Any, expected: str, from_text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_text:
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
    raise ConfigError(key, expected, value)


def _int(key: str, value: Any, expected: str, from_text: bool) -> int:
    if isinstance(value, bool):  # bool is an int subclass: True must not pass for 1
        raise ConfigError(key, expected, value)
    if isinstance(value, int):
        return int(value)
    if from_text and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ConfigError(key, expected, value)


def _float(key: str, value: Any, expected: str, from_text: bool) -> float:
    if isinstance(value, bool):
        raise ConfigError(key, expected, value)
    if isinstance(value, (int, float)):
        result = float(value)
    elif from_text and isinstance(value, str):
        try:
            result = float(value)
        except ValueError:
            raise ConfigError(key, expected, value) from None
    else:
        raise ConfigError(key, expected, value)
    if not math.isfinite(result):
        raise ConfigError(key, expected, value)
    return result


def _tuple(key: str, value: Any, base: Any, expected: str, from_text: bool) -> tuple:
    items: Any = value
    if from_text and isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "(")):
            try:
                items = json.loads("[" + text[1:-1] + "]") if text.endswith(("]", ")")) else None
            except json.JSONDecodeError:
                items = None
        else:
            items = [part.strip() for part in text.split(",")] if text else []
        if items is None:
            raise ConfigError(key, expected, value)
    if not isinstance(items, (list, tuple)):
        raise ConfigError(key, expected, value)
    element = typing.get_args(base)[0]
    return tuple(_value(f"{key}[{i}]", item, element, from_text) for i, item in enumerate(items))


# --- whole configs --------------------------------------------------------------------------
def check_config(cfg: Any, prefix: str = "") -> None:
    """Check every field of the dataclass ``cfg`` (nested dataclasses too) against its
    annotation: exact types (an int is accepted for a float), ranges, choices; then each
    dataclass's own ``__post_init__`` checks (cross-field rules such as CHAN's heads dividing
    ``embed_size``). Raises :class:`ConfigError` (or the ``__post_init__``'s ``ValueError``)."""
    if not dataclasses.is_dataclass(cfg):
        return
    hints = field_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_config(value, f"{key}.")
        else:
            _value(key, value, hints.get(f.name, Any), from_text=False)
    if hasattr(cfg, "__post_init__"):
        try:
            dataclasses.replace(cfg)  # runs __post_init__ on a copy: cross-field rules
        except ValueError as err:
            if not prefix or isinstance(err, ConfigError):
                raise
            raise ValueError(f"{prefix.rstrip('.')}: {err}") from None
