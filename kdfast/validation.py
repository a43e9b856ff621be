"""Config dataclasses checked against their annotations: types, list/dict shapes, Literal choices and the ranges
Annotated[..., Range(...)] attach, recursively, with errors that name the key and the fix."""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal


@dataclass(frozen=True)
class Range:
    """The interval a number must lie in: ge/gt bound it below, le/lt above (None: unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def text(self) -> str:
        parts = [f"{op} {b:g}" for op, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if b is not None]
        return " and ".join(parts)

    def complaint(self, v) -> str | None:
        """What is wrong with v in words (the text of config and flag errors alike), or None when v holds."""
        return None if v is None or self.holds(v) else f"{v!r} is out of range; give a number {self.text()}"


# The ranges most settings need: `epochs: PositiveFloat = 3.0` is a field with its check.
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]

_NAMES = {int: "an integer", float: "a number", str: "text", bool: "true or false", type(None): "null"}


def check_config(obj, error: type[Exception] = ValueError, path: str = ""):
    """Check (and normalize: an int where a float is due becomes a float) every field of the dataclass `obj`,
    and of the dataclasses in it, against its annotation; raise `error` naming the dotted key. Returns obj."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        where = f"{path}.{f.name}" if path else f.name
        setattr(obj, f.name, check_value(getattr(obj, f.name), hints[f.name], where, error))
    return obj


def check_value(value, hint, where: str, error: type[Exception] = ValueError):
    """`value` checked against the type `hint`; returns it (ints given for floats as floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return check_config(value, error, where)
    if origin is Annotated:
        value = check_value(value, args[0], where, error)
        for bound in args[1:]:
            if isinstance(bound, Range) and (problem := bound.complaint(value)):
                raise error(f"{where}: {problem}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return check_value(value, option, where, error)
            except error as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0]
        raise error(f"{where}: expected {describe(hint)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean {close[0]!r}?)" if close else ""
            raise error(f"{where}: unknown value {value!r}{hint_text}; choose from {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise error(f"{where}: expected a list, got {value!r}; write a list, e.g. {where}=[{value}]")
        return [check_value(v, args[0], where, error) for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping of keys, e.g. {{name: value}}, got {value!r}")
        if not args:
            return value
        return {check_value(k, args[0], where, error): check_value(v, args[1], f"{where}.{k}", error)
                for k, v in value.items()}
    return _scalar(value, hint, where, error)


def _scalar(value, hint, where: str, error):
    ok = {bool: isinstance(value, bool), str: isinstance(value, str), type(None): value is None,
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool)}.get(hint)
    if ok is None:
        raise TypeError(f"{where}: check_value cannot check the type {hint!r}")
    if not ok:
        raise error(f"{where}: expected {describe(hint)}, got {value!r}")
    if hint is float:
        if math.isnan(value):
            raise error(f"{where}: expected a number, got NaN")
        return float(value)
    return value


def choices(hint) -> tuple | None:
    """The values a Literal annotation allows (None last where the hint is optional), or None for other hints."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return choices(args[0])
    if origin is Literal:
        return args
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        allowed = choices(inner[0]) if len(inner) == 1 else None
        return allowed + (None,) * (type(None) in args) if allowed else None
    return None


def describe(hint) -> str:
    """A type in words: 'an integer or null'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return describe(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def check_device(device: str | None, where: str, error: type[Exception] = ValueError) -> None:
    """A device string torch knows and this machine has (cuda:N needs N GPUs)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise error(f"{where}: unknown device {device!r}; "
                    "give cpu, cuda, cuda:1, mps ... (or leave it unset)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise error(f"{where}: {device!r} is not usable here ({have} CUDA device(s)); give cpu or leave it unset")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise error(f"{where}: 'mps' is not usable here; give cpu or leave it unset")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise error(f"{where}: device {device!r} is not supported; give cpu or cuda (or leave it unset)")
