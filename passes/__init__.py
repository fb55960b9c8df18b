"""mpcompiler's passes, one per file. ``mpcompiler.api.pipeline`` lists compile's in order; the search's
re-plan, ``export_onnx`` (the ONNX lowering), ``cuda_graph()`` and ``mpcompiler.llm.Generator`` (the generation
and decode steps) run small lists of their own."""

from mpcompiler.passes.assign_fp8 import AssignFp8
from mpcompiler.passes.assign_precision import AssignPrecision
from mpcompiler.passes.calibrate_ranges import CalibrateRanges
from mpcompiler.passes.carry_decode_state import CarryDecodeState
from mpcompiler.passes.channels_last import ChannelsLast
from mpcompiler.passes.clean_graph import CleanGraph
from mpcompiler.passes.eliminate_casts import EliminateCasts
from mpcompiler.passes.fold_batch_norm import FoldBatchNorm
from mpcompiler.passes.insert_casts import InsertCasts
from mpcompiler.passes.insert_kv_cache import InsertKvCache
from mpcompiler.passes.low_precision_io import LowPrecisionIo
from mpcompiler.passes.lower_decode_step import LowerDecodeStep
from mpcompiler.passes.lower_fp8 import LowerFp8
from mpcompiler.passes.lower_fused import LowerFused
from mpcompiler.passes.lower_prompt_step import LowerPromptStep
from mpcompiler.passes.place_casts import PlaceCasts
from mpcompiler.passes.search_precision import SearchPrecision

__all__ = [
    "AssignFp8",
    "AssignPrecision",
    "CalibrateRanges",
    "CarryDecodeState",
    "ChannelsLast",
    "CleanGraph",
    "EliminateCasts",
    "FoldBatchNorm",
    "InsertCasts",
    "InsertKvCache",
    "LowPrecisionIo",
    "LowerDecodeStep",
    "LowerFp8",
    "LowerFused",
    "LowerPromptStep",
    "PlaceCasts",
    "SearchPrecision",
]
