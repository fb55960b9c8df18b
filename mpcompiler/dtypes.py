"""The dtype vocabulary: which dtypes are "low", how users may spell them, and how dumps and reports
name them. ``compile(dtype=...)`` and ``export_onnx(io_dtype=...)`` parse with :func:`parse`; dumps print
:func:`short` (``f16``), reports and ONNX metadata :func:`name` (``float16``)."""

from __future__ import annotations

import torch

LOW = (torch.float16, torch.bfloat16)  # the low-precision dtypes a plan may put an op in

# a user's spellings of the low dtypes
SPELLINGS = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    torch.float16: torch.float16,
    torch.bfloat16: torch.bfloat16,
}

# compile(dtype="fp8"): e4m3 GEMMs where the tolerance allows, fp16 elsewhere (not a dtype of values: a level
# of the linears' inputs, mpcompiler.fp8)
FP8_SPELLINGS = ("fp8", "e4m3", "float8_e4m3fn", torch.float8_e4m3fn)

SHORT = {
    torch.float8_e4m3fn: "f8",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
}


def parse(value) -> torch.dtype | None:
    """The low dtype ``value`` spells (``"fp16"``, ``"bfloat16"``, ``torch.float16`` ...); None if none."""
    try:
        return SPELLINGS.get(value)
    except TypeError:  # unhashable
        return None


def short(dtype: torch.dtype | None) -> str:
    """``f16``, ``bf16``, ``f32`` ...: how dumps name a dtype (``-`` for none)."""
    return SHORT.get(dtype, str(dtype).removeprefix("torch.")) if dtype is not None else "-"


def name(dtype: torch.dtype | None) -> str | None:
    """``float16``, ``bfloat16`` ...: how reports and ONNX metadata name a dtype."""
    return str(dtype).removeprefix("torch.") if dtype is not None else None
