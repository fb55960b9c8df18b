"""mpcompiler's errors: each names the cause (op, sample, module path) and what to try."""


class MpCompilerError(Exception):
    """Base class of mpcompiler's errors."""


class CaptureError(MpCompilerError):
    """The model could not be captured with torch.export, or the samples do not fit one graph."""


class CalibrationError(MpCompilerError):
    """A calibration sample could not be run, or gave NaN or inf in the fp32 model's outputs."""


class PassError(MpCompilerError):
    """A pass failed or left an invalid graph; the message names the pass and where its IR is."""


class OptionError(MpCompilerError, ValueError):
    """An option of compile() has a bad value, or names nothing in the model (keep_fp32)."""


class InputError(MpCompilerError, ValueError):
    """The compiled module was called with an input it was not compiled for: another rank, another size
    in a static dim, or another kind of dtype (float for int, say)."""


class ExportError(MpCompilerError):
    """The compiled module could not be exported to ONNX, or the artifact failed its checks."""


class ToleranceError(MpCompilerError):
    """No mixed-precision plan meets the tolerance asked for (short of running everything in fp32)."""
