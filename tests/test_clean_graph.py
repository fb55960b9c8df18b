"""clean_graph: asserts, eval dropout, no-op casts and dead code go; capture leaves no in-place op."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpcompiler
from mpcompiler.ir import op_name
from tests.helpers import TOL, nodes_by_op, rel_err, run_pipeline, stages, why_not


class Messy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, mask):
        y = self.drop(self.fc(x)).to(x.device)  # export writes this as to(dtype=float32, device=...)
        y.relu_()
        z = y.clone()
        z.add_(1.0)
        unused = y * 3  # noqa: F841 - dead code
        return z + y + mask.to(torch.float32)  # int -> float: a real conversion, kept


def _data():
    return [(torch.randn(4, 8), torch.randint(0, 2, (4, 8))) for _ in range(2)]


def test_clean_graph_rewrites_and_keeps_numbers():
    model = Messy().eval()
    gm = stages(model, _data(), upto="clean_graph")
    ops = [op_name(n) for n in gm.graph.nodes if n.op == "call_function"]
    assert "dropout" not in ops and "_assert_tensor_metadata" not in ops
    assert "relu_" not in ops and "add_" not in ops and "relu" in ops
    casts = nodes_by_op(gm, "to") + nodes_by_op(gm, "_to_copy")
    assert len(casts) == 1 and casts[0].args[0].name == "mask"  # only the int -> float conversion stays
    x, mask = _data()[0]
    assert torch.equal(gm(x, mask), model(x, mask))


class MustStay(nn.Module):
    """A dropout the model runs in training mode, whatever the module's mode, and casts that convert."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, mask):
        return F.dropout(self.fc(x), 0.1, training=True) + mask.to(torch.float32) + x.half().float()


def test_a_training_dropout_and_converting_casts_stay_and_say_why():
    gm, results = run_pipeline(MustStay().eval(), _data(), upto="clean_graph")
    result = results["clean_graph"]
    assert result.stats["dropouts_removed"] == result.stats["noop_casts_removed"] == 0
    assert why_not(result, "dropouts_removed", besides="not a dropout") == {"in training mode": 1}
    # the mask int -> f32, x f32 -> f16 and back f16 -> f32: each changes its input's dtype
    assert why_not(result, "noop_casts_removed", besides="not a cast") == {"converts": 3}
    (dropout,) = nodes_by_op(gm, "dropout")
    assert dropout.args[2] is True and len(nodes_by_op(gm, "to")) == 3


class MutatesInput(nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x + 1


def test_mutating_an_input_in_place_is_an_error_naming_the_op():
    with pytest.raises(mpcompiler.CaptureError, match="op mul_ at top level writes in place into model input x"):
        mpcompiler.compile(MutatesInput(), [torch.randn(2, 4)])


def test_compiled_inplace_model_matches_fp32():
    model = Messy().eval()
    compiled = mpcompiler.compile(model, _data())
    x, mask = torch.randn(3, 8), torch.randint(0, 2, (3, 8))
    assert rel_err(compiled(x, mask), model(x, mask)) < TOL[torch.float16]
