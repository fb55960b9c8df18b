"""The op table's claims, checked against the kernels.

FP32_INSIDE says a kernel computes in fp32 when handed fp16/bf16 tensors. If that holds, its error
on low-precision inputs (against fp64 math on the same rounded inputs) is the rounding of its output
and little more; a kernel that accumulated in fp16 would be far off.
"""

import pytest
import torch
import torch.nn.functional as F

from mpcompiler.ops import FOLLOW_OPS, FP32_INSIDE, FP32_OPS, LOW_OPS
from tests.helpers import rel_err


def _bn_stats(dtype):
    g = torch.Generator().manual_seed(2)
    p = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(8, generator=g).to(p), (torch.rand(8, generator=g) + 0.5).to(p)


CASES = {
    "layer_norm": lambda x: F.layer_norm(x, x.shape[-1:]),
    "rms_norm": lambda x: F.rms_norm(x, x.shape[-1:]),
    "group_norm": lambda x: F.group_norm(x.reshape(4, 8, -1), 4),
    # the parameters stay fp32 on low-precision I/O, as insert_casts keeps them (fp32_args)
    "batch_norm": lambda x: F.batch_norm(x.reshape(4, 8, -1), *_bn_stats(x.dtype)),
    "softmax": lambda x: F.softmax(x, -1),
    "log_softmax": lambda x: F.log_softmax(x, -1),
    "sum": lambda x: x.sum(-1),
    "mean": lambda x: x.mean(-1),
    "avg_pool2d": lambda x: F.avg_pool2d(x.reshape(4, 8, 16, 32), 4),
    "adaptive_avg_pool2d": lambda x: F.adaptive_avg_pool2d(x.reshape(4, 8, 16, 32), 1),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_inside_kernels_round_once(name, dtype):
    assert name in FP32_INSIDE
    x = (torch.randn(32, 512) * 40 + 20).to(dtype)  # sums of 512 such values lose digits in fp16
    fn = CASES[name]
    torch.manual_seed(1)
    low = fn(x)
    torch.manual_seed(1)
    exact = fn(x.double())
    assert low.dtype == dtype
    rounding = rel_err(exact.to(dtype), exact)  # the error of one rounding of the exact result
    assert rel_err(low, exact) <= 1.5 * rounding + 1e-6


def test_layer_norm_whose_squares_overflow_fp16_stays_finite():
    x = (torch.randn(16, 768) * 600).half()  # x^2 reaches ~1e6, past fp16's 65504
    assert torch.isfinite(F.layer_norm(x, (768,))).all()
    assert not torch.isfinite(x * x).all()


def test_classes_do_not_overlap():
    groups = [set(LOW_OPS), set(FP32_INSIDE), set(FP32_OPS), set(FOLLOW_OPS)]
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            assert not a & b, a & b
