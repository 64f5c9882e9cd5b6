"""Argument validation for every room, in one grammar.

Every message reads "`functx.<api>`: `<arg>` must be ..., got ...", where ``api`` is the public
name after ``functx.`` (``"grad"``, ``"solvers.cg"``, ``"curvature.eigsh"``,
``"curvature.KFACOperator"``). ``TypeError`` for a value of the wrong kind, ``ValueError`` for a
value of the right kind that is out of range. A room that needs a new check adds it here; a
message that describes a value uses :func:`describe`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

_T = TypeVar("_T")


def api_name(api: str) -> str:
    """The public name in backticks: ``"grad"`` -> ``"`functx.grad`"`` (a full name is kept)."""
    name = api.strip("`")
    return f"`{name}`" if name.startswith("functx") else f"`functx.{name}`"


def describe(value: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a value of type {type(value).__name__}"


def fail(api: str, message: str, kind: type[Exception] = ValueError) -> Exception:
    """An exception ``kind`` whose text starts with the API name: ``raise fail(api, "...")``."""
    return kind(f"{api_name(api)}: {message}")


def is_number(value: Any) -> bool:
    """A real Python number (``bool`` excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_callable(func: Any, name: str, api: str, optional: bool = False) -> None:
    """``TypeError`` unless ``func`` is callable (or ``None`` when ``optional``)."""
    if func is None and optional:
        return
    if not callable(func):
        kind = "None or a callable" if optional else "callable"
        raise fail(api, f"`{name}` must be {kind}, got {describe(func)}.", TypeError)


def check_bool(value: Any, name: str, api: str) -> bool:
    """``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise fail(api, f"`{name}` must be a bool, got {value!r}.", TypeError)
    return value


def check_choice(value: Any, name: str, choices: Sequence[_T], api: str) -> _T:
    """``value`` if it is one of ``choices``."""
    if not isinstance(value, str) and any(isinstance(c, str) for c in choices):
        raise fail(api, f"`{name}` must be one of {list(choices)}, got {describe(value)}.", TypeError)
    if value not in choices:
        raise fail(api, f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value  # type: ignore[no-any-return]


def check_int(value: Any, name: str, api: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(api, f"`{name}` must be an int, got {describe(value)}.", TypeError)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise fail(api, f"`{name}` must be an int {_range(minimum, maximum)}, got {value}.")
    return value


def check_optional_int(
    value: Any, name: str, api: str, *, minimum: int | None = None, maximum: int | None = None
) -> int | None:
    """``None`` or :func:`check_int`."""
    return None if value is None else check_int(value, name, api, minimum=minimum, maximum=maximum)


def check_chunk_size(chunk_size: Any, api: str) -> int | None:
    """``None`` or a positive ``int``."""
    return check_optional_int(chunk_size, "chunk_size", api, minimum=1)


def check_seed(seed: Any, api: str) -> int:
    """An ``int`` seed."""
    return check_int(seed, "seed", api)


def check_float(
    value: Any,
    name: str,
    api: str,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    finite: bool = True,
) -> float:
    """``value`` (a real Python number) as a ``float``; optionally ``> 0`` or ``>= 0`` and finite."""
    if not is_number(value):
        raise fail(api, f"`{name}` must be a real number, got {describe(value)}.", TypeError)
    x = float(value)
    if math.isnan(x) or (finite and math.isinf(x)):
        raise fail(api, f"`{name}` must be a finite number, got {value!r}.")
    if positive and not x > 0:
        raise fail(api, f"`{name}` must be positive, got {value!r}.")
    if nonnegative and not x >= 0:
        raise fail(api, f"`{name}` must be non-negative, got {value!r}.")
    return x


def check_positive(value: Any, name: str, api: str) -> float:
    """A positive finite ``float``."""
    return check_float(value, name, api, positive=True)


def check_nonnegative(value: Any, name: str, api: str) -> float:
    """A non-negative finite ``float``."""
    return check_float(value, name, api, nonnegative=True)


def check_scalar_tensor_or_float(value: Any, name: str, api: str, *, nonnegative: bool = True) -> float | torch.Tensor:
    """A non-negative finite number, or a real floating-point 0-d tensor (kept, so that it stays
    differentiable); a tensor's value is checked only outside transforms and compilation."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise fail(
                api, f"`{name}` must be a float or a real floating-point 0-d tensor, got {describe(value)}.", TypeError
            )
        from ._torch_internals import transforms_active

        if nonnegative and not transforms_active() and not torch.compiler.is_compiling():
            x = float(value.detach())
            if not (math.isfinite(x) and x >= 0):
                raise fail(api, f"`{name}` must be finite and non-negative, got {x!r}.")
        return value
    return check_float(value, name, api, nonnegative=nonnegative)


def _range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"in [{minimum}, {maximum}]"
    return f">= {minimum}" if minimum is not None else f"<= {maximum}"


def check_tolerance(value: Any, name: str, api: str, default: float) -> float:
    """``default`` for ``None``, else a non-negative finite ``float`` (a solver tolerance)."""
    if value is None:
        return default
    if not is_number(value):
        raise fail(api, f"`{name}` must be None or a non-negative float, got {describe(value)}.", TypeError)
    return check_nonnegative(value, name, api)


def check_keys(mapping: Any, name: str, api: str, hint: str = "") -> None:
    """``TypeError`` unless every key of ``mapping`` is a ``str`` (names, as in ``state_dict``)."""
    for key in mapping:
        if not isinstance(key, str):
            raise fail(
                api, f"`{name}` must be keyed by str names, got the key {key!r} ({describe(key)}).{hint}", TypeError
            )


def check_optional_bool(value: Any, name: str, api: str) -> bool | None:
    """``None``, ``True`` or ``False``."""
    if value is not None and not isinstance(value, bool):
        raise fail(api, f"`{name}` must be None or a bool, got {value!r}.", TypeError)
    return value


def check_instance(value: Any, types: type | tuple[type, ...], name: str, api: str, kind: str) -> Any:
    """``value`` if it is an instance of ``types``, else ``TypeError`` ("`name` must be <kind>")."""
    if not isinstance(value, types):
        raise fail(api, f"`{name}` must be {kind}, got {describe(value)}.", TypeError)
    return value


def check_optional_float_dtype(value: Any, name: str, api: str) -> torch.dtype | None:
    """``None`` or a floating-point ``torch.dtype`` (``TypeError`` for another kind,
    ``ValueError`` for a dtype that is not floating point)."""
    if value is None:
        return None
    if not isinstance(value, torch.dtype):
        raise fail(api, f"`{name}` must be None or a floating-point torch.dtype, got {describe(value)}.", TypeError)
    if not value.is_floating_point:
        raise fail(api, f"`{name}` must be None or a floating-point torch.dtype, got {value}.")
    return value
