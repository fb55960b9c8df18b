"""mpcompiler: a mixed-precision graph compiler for PyTorch inference.

import mpcompiler
compiled = mpcompiler.compile(model, calib_data)   # fp16 by default; dtype="bfloat16" works too
y = compiled(*args, **kwargs)                      # same signature and outputs as model
compiled.graph_module                              # the emitted torch.fx.GraphModule
compiled.report                                    # per node: op, module path, dtype, range, reason
compiled.export_onnx("model.onnx")                 # ONNX for ONNX Runtime, verified, with a handoff file
fast = compiled.cuda_graph(example)                # on the GPU: one CUDA graph replay per call, fixed shapes
"""

from mpcompiler.api import CompiledModule, Options, compile
from mpcompiler.emit_onnx import OnnxArtifact
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
from mpcompiler.report import Report

__version__ = "0.1.0"

__all__ = [
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
    "compile",
]
