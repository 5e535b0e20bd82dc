"""Checking and parsing option values, shared by every stage config and the CLI.

Errors are `ConfigError`s that name the library's parameter (the CLI maps it to a flag). Light:
no numpy, no torch at import time (`resolve_device` imports torch when called).
"""

from __future__ import annotations

import re
from typing import Any

from medsclean.errors import ConfigError


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    from importlib.util import find_spec

    return find_spec(module) is not None


def require(ok: bool, stage: str, param: str | tuple[str, ...], message: str) -> None:
    """ConfigError(param, message, stage=stage) unless `ok`."""
    if not ok:
        raise ConfigError(param, message, stage=stage)


def one_of(stage: str, param: str, value: Any, choice: type) -> None:
    """ConfigError unless `value` is one of the enum `choice`'s values."""
    require(value in choice.values(), stage, param,
            f"{param} must be one of {', '.join(choice.values())}, not {value!r}")


MAX_SEED = 2**31 - 1
"""The largest seed: every generator a seed reaches takes it (faiss's k-means seed is a C int; NumPy
and torch take more)."""


def check_seed(seed: Any, stage: str = "run") -> None:
    """ConfigError (param "seed") unless `seed` is an integer from 0 to `MAX_SEED`."""
    import numbers

    require(isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED, stage,
            "seed", f"seed must be an integer from 0 to {MAX_SEED}, not {seed!r}")


def divisor_near(number: int, target: int) -> int:
    """The divisor of `number` closest to `target` (the smaller one on a tie): a head count to suggest."""
    return min((d for d in range(1, number + 1) if number % d == 0), key=lambda d: (abs(d - target), d))


def stride_pair(value: tuple[int, int] | str, stage: str, *, example: tuple[int, int]) -> tuple[int, int]:
    """`value` as (fine, coarse) strides: a pair, or text such as "16,32"; ConfigError (param
    "stages", quoting `example`) unless two increasing powers of 2."""
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        pair = tuple(int(v) for v in parts)
    except (TypeError, ValueError):
        pair = ()
    ok = len(pair) == 2 and all(v >= 2 and v & (v - 1) == 0 for v in pair) and pair[0] < pair[1]
    require(ok, stage, "stages", f"stages must be two increasing strides that are powers of 2, such as "
            f"{example[0]},{example[1]}, not {value!r}")
    return pair  # type: ignore[return-value]


DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
"""The values of a `device` option."""

_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
               "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes of a size: an int, or a string like "4GB", "512MiB", "1.5G", "2000000" (GB = 10^9, GiB = 2^30).

    Raises:
        ValueError: not a size.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size must be 0 or more, not {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (e.g. 4GB, 512MiB, or bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str) -> float:
    """Seconds in "90s", "10m", "1.5h" or a bare number of seconds; ConfigError(param "budget") otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    require(bool(match) and float(match.group(1)) > 0, "select", "budget",
            f"budget must be a positive duration such as 90s, 10m or 1h, not {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def resolve_device(device: str) -> str:
    """`auto` → cuda when a GPU is visible, else cpu; an unavailable cuda is a usage error."""
    require(re.fullmatch(DEVICE_PATTERN, device) is not None, "extract", "device",
            f"device must be auto, cpu or cuda[:N], not {device!r}")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    require(not device.startswith("cuda") or torch.cuda.is_available(), "extract", "device",
            f"device {device}: no CUDA device is visible; use cpu or auto")
    return device
