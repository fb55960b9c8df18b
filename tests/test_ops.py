"""The op table: its claims checked against the kernels, and its rows checked for what they must say.

``fp32_inside`` says a kernel computes in fp32 when handed fp16/bf16 tensors. If that holds, its error
on low-precision inputs (against fp64 math on the same rounded inputs) is the rounding of its output
and little more; a kernel that accumulated in fp16 would be far off.
"""

import pytest
import torch
import torch.nn.functional as F

from mpcompiler import ops
from mpcompiler.ir import OpClass
from mpcompiler.ops import OPS
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
    assert OPS[name].fp32_inside
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


def test_an_op_has_one_row():
    # rows are grouped by the facts they share; an op named in two groups would have two rows that disagree
    with pytest.raises(ValueError, match=r"two rows in the op table: \['mm'\]"):
        ops._table(ops._rows("mm bmm", OpClass.LOW), ops._rows("mm", OpClass.FP32))
    # the name sets passes test against are read from the table, not kept beside it
    assert ops.FOLLOW_OPS == {name for name, rule in OPS.items() if rule.op_class is OpClass.FOLLOW}
    assert ops.SAME_VALUES == {name for name, rule in OPS.items() if rule.same_values} < ops.FOLLOW_OPS
    tables = {name for name, value in vars(ops).items() if isinstance(value, (set, frozenset, dict)) and name.isupper()}
    assert tables == {"OPS", "FOLLOW_OPS", "SAME_VALUES", "_WHY"}


def test_ops_with_low_precision_io_say_what_they_compute_inside():
    # a LOW op or an fp32-inside kernel runs with fp16 I/O while it accumulates: its row measures what it
    # accumulates (the inside rule can then keep it out of fp16), or says why it does not
    silent = [
        name
        for name, rule in OPS.items()
        if (rule.op_class is OpClass.LOW or rule.fp32_inside)
        and not callable(rule.inside)
        and not (isinstance(rule.inside, str) and rule.inside.startswith("not measured"))
    ]
    assert not silent, f"rows with neither an inside rule nor why there is none: {silent}"
    assert callable(OPS["linear"].inside) and callable(OPS["layer_norm"].inside)


def _schema_names(name: str) -> set[str]:
    """The argument names of every overload of an ATen op, or of a prims op (``prims.name``)."""
    ns, _, short = name.rpartition(".")
    packet = getattr(getattr(torch.ops, ns or "aten"), short)
    return {a.name for overload in packet.overloads() for a in getattr(packet, overload)._schema.arguments}


class _Reads(dict):
    """Arguments that note which names a rule reads (any value will do: only the names are checked)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __getitem__(self, name):
        self.names.add(name)
        return torch.ones(2, 2)

    def get(self, name, default=None):
        self.names.add(name)
        return default


def test_rows_name_their_ops_arguments_as_the_schema_does():
    # a misspelt argument would make an inside rule fail in calibration, or an fp32 argument be cast down
    for name, rule in OPS.items():
        schema = _schema_names(name)
        assert set(rule.fp32_args) | set(rule.saturating_args) <= schema, name
        if callable(rule.inside):
            args = _Reads()
            try:
                rule.inside(args)
            except Exception:  # the values are made up; the names read before the math are what counts
                pass
            assert args.names and args.names <= schema, (name, args.names - schema)
