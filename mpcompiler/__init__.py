"""mpcompiler: a mixed-precision graph compiler for PyTorch inference.

import mpcompiler
compiled = mpcompiler.compile(model, calib_data)   # fp16 by default; dtype="bfloat16" works too
y = compiled(*args, **kwargs)                      # same signature and outputs as model
compiled.graph_module                              # the emitted torch.fx.GraphModule
compiled.report                                    # per node: op, module path, dtype, range, reason
compiled.export_onnx("model.onnx")                 # ONNX for ONNX Runtime, verified, with a handoff file
fast = compiled.cuda_graph(example)                # on the GPU: one CUDA graph replay per call, fixed shapes
mpcompiler.calibrate(model, part).save("part.pt")   # calibration statistics of one process, to merge
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mpcompiler._version import __version__
from mpcompiler.errors import (
    CalibrationError,
    CaptureError,
    ExportError,
    InputError,
    MpCompilerError,
    OptionError,
    PassError,
    ToleranceError,
)

if TYPE_CHECKING:
    from mpcompiler.api import CompiledModule, Options, calibrate, compile
    from mpcompiler.dynamo_backend import backend
    from mpcompiler.emit_onnx import OnnxArtifact
    from mpcompiler.passes.calibrate_ranges import Calibration
    from mpcompiler.report import Report

# The compiler's names load on first use (PEP 562): importing torch and the compiler takes seconds,
# which the command line's --help and a script that only catches mpcompiler's errors need not pay.
_LAZY = {
    "compile": "mpcompiler.api",
    "calibrate": "mpcompiler.api",
    "Calibration": "mpcompiler.passes.calibrate_ranges",
    "CompiledModule": "mpcompiler.api",
    "Options": "mpcompiler.api",
    "OnnxArtifact": "mpcompiler.emit_onnx",
    "backend": "mpcompiler.dynamo_backend",
    "Report": "mpcompiler.report",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mpcompiler' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Calibration",
    "CalibrationError",
    "CaptureError",
    "CompiledModule",
    "ExportError",
    "InputError",
    "MpCompilerError",
    "OnnxArtifact",
    "OptionError",
    "Options",
    "PassError",
    "Report",
    "ToleranceError",
    "__version__",
    "backend",
    "calibrate",
    "compile",
]
