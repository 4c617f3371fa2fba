"""The one dtype table: names, safetensors codes, sizes, and torch dtypes resolved on use.

Every place that turns a dtype into something else (a ``config.json`` ``dtype`` string into a
torch dtype, a safetensors header code into a byte size, a torch dtype into a header code) reads
this table.  It imports nothing heavy: torch dtypes are looked up only when asked for
(:func:`torch_dtype`), so the torch-free conversion path (:mod:`trtlm.convert.bytecopy`) and
``trtlm inspect`` can use it without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DType:
    """One element type.

    :param name: torch's attribute name (``torch.<name>``), also the ``config.json`` spelling.
    :param st: the safetensors header code.
    :param itemsize: bytes per element.
    :param float_bits: for IEEE-style floats, ``(exponent mask, magnitude mask)`` of the element
        viewed as an unsigned integer: an element is NaN or Inf when ``x & exponent == exponent``
        (used to check weights without torch); ``None`` for integer types and float8 (whose
        e4m3fn has no Inf, and whose NaN the torch path checks).
    """

    name: str
    st: str
    itemsize: int
    float_bits: tuple[int, int] | None = None

    @property
    def is_float(self) -> bool:
        return self.name.startswith(("float", "bfloat"))


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float64", "F64", 8, (0x7FF0_0000_0000_0000, 0x7FFF_FFFF_FFFF_FFFF)),
    DType("float32", "F32", 4, (0x7F80_0000, 0x7FFF_FFFF)),
    DType("float16", "F16", 2, (0x7C00, 0x7FFF)),
    DType("bfloat16", "BF16", 2, (0x7F80, 0x7FFF)),
    DType("float8_e4m3fn", "F8_E4M3", 1),
    DType("float8_e5m2", "F8_E5M2", 1),
    DType("int64", "I64", 8),
    DType("int32", "I32", 4),
    DType("int16", "I16", 2),
    DType("int8", "I8", 1),
    DType("uint8", "U8", 1),
    DType("bool", "BOOL", 1),
)}
BY_ST: dict[str, DType] = {d.st: d for d in DTYPES.values()}

#: Short spellings found in config files (FasterTransformer's ``weight_data_type``, ``--dtype``).
ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32",
           "fp8": "float8_e4m3fn"}

#: The dtypes a checkpoint's float weights may be written in (``--dtype``).
CHECKPOINT_DTYPES = ("float32", "float16", "bfloat16")


def lookup(dtype: Any) -> DType | None:
    """The table entry for a name (``"bfloat16"``, ``"torch.bfloat16"``, ``"bf16"``), a
    safetensors code (``"BF16"``) or a torch dtype; ``None`` when unknown."""
    if isinstance(dtype, DType):
        return dtype
    text = str(dtype)  # str(torch.bfloat16) == "torch.bfloat16"
    if text.startswith("torch."):
        text = text[len("torch."):]
    return DTYPES.get(ALIASES.get(text, text)) or BY_ST.get(text)


def get(dtype: Any) -> DType:
    """:func:`lookup`, raising ``KeyError`` with the known names for an unknown one."""
    found = lookup(dtype)
    if found is None:
        raise KeyError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    return found


def torch_dtype(dtype: Any):
    """``torch.<name>`` for anything :func:`lookup` knows (imports torch)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, get(dtype).name)


def safetensors_code(dtype: Any) -> str:
    """The safetensors header code (``"BF16"``) of a name or torch dtype."""
    return get(dtype).st


def itemsize(dtype: Any) -> int:
    return get(dtype).itemsize
