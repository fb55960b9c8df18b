"""assign_precision: op classes, the range rule and keep_fp32, checked on decisions and on numbers."""

import pytest
import torch
import torch.nn as nn

import mpcompiler
from mpcompiler.ir import OpClass, Rule, record
from tests.helpers import TOL, Overflow, Tiny, ir_lines, nodes_by_op, rel_err, stages


def _tiny_data():
    return [torch.randn(8, 16) for _ in range(3)]


def test_op_classes_on_tiny():
    gm = stages(Tiny().eval(), _tiny_data(), upto="assign_precision")
    (fc1, fc2), (ln,), (relu,), (sm,) = (nodes_by_op(gm, o) for o in ("linear", "layer_norm", "relu", "softmax"))
    assert record(fc1).dtype == record(fc2).dtype == torch.float16 and record(fc1).op_class is OpClass.LOW
    assert record(relu).dtype == torch.float16 and record(relu).rule == "follows inputs"
    for fragile in (ln, sm):  # fp32 math inside the kernel, fp16 I/O
        assert record(fragile).dtype == torch.float16 and record(fragile).math_dtype == torch.float32
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert record(x).dtype == torch.float32  # inputs stay as the user passes them


class ExpHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.emb = nn.Embedding(20, 8)

    def forward(self, x, ids):
        return torch.exp(self.fc(x)) + self.emb(ids)


def test_fragile_op_runs_fp32_and_parameter_only_op_goes_low():
    data = [(torch.randn(4, 8), torch.randint(0, 20, (4,))) for _ in range(2)]
    gm = stages(ExpHead().eval(), data, upto="assign_precision")
    (exp,), (emb,), (add,) = nodes_by_op(gm, "exp"), nodes_by_op(gm, "embedding"), nodes_by_op(gm, "add")
    assert record(exp).dtype == torch.float32 and "exp" in record(exp).reason
    assert record(emb).dtype == torch.float16 and "parameters" in record(emb).reason
    assert record(add).dtype == torch.float32  # f32 + f16 promotes
    model = ExpHead().eval()
    compiled = mpcompiler.compile(model, data)
    x, ids = torch.randn(3, 8), torch.randint(0, 20, (3,))
    assert rel_err(compiled(x, ids), model(x, ids)) < TOL[torch.float16]


def test_range_rule_names_output_and_input_overflow():
    gm = stages(Overflow().eval(), [torch.randn(16, 16) for _ in range(4)], upto="assign_precision")
    fc0, fc1, fc2, fc3 = nodes_by_op(gm, "linear")
    assert record(fc0).dtype == record(fc3).dtype == torch.float16
    assert record(fc1).dtype == torch.float32 and record(fc1).rule == "range"
    assert record(fc1).reason.startswith("output reaches")
    assert record(fc2).dtype == torch.float32 and record(fc2).reason.startswith("input %relu reaches")


class MaskedScores(nn.Module):
    """Attention scores masked as HF writes it (the fill value fp32's lowest, past fp16's and bf16's range), or
    with a large int as some models do."""

    def __init__(self, op: str, fill: float | int):
        super().__init__()
        self.q, self.op, self.fill = nn.Linear(8, 8), op, fill

    def forward(self, x, mask):
        scores, keep = self.q(x) @ x.transpose(-1, -2), mask[:, None, :].bool()
        if self.op == "masked_fill":
            scores = scores.masked_fill(~keep, self.fill)
        else:
            scores = torch.where(keep, scores, self.fill)
        return scores.softmax(-1) @ x


@pytest.mark.parametrize("op", ["masked_fill", "where"])
@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, -(10**9)], ids=["fp32 lowest", "int"])
@pytest.mark.parametrize("dtype", ["float16", "auto"])
def test_a_fill_value_past_the_low_dtypes_range_keeps_the_fill_high_though_calibration_never_filled(op, fill, dtype):
    model = MaskedScores(op, fill).eval()
    unpadded = [(torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.long)) for _ in range(5)]
    compiled = mpcompiler.compile(model, unpadded, dtype=dtype)  # fp16: masked_fill refused the constant here
    (node,), (softmax,) = nodes_by_op(compiled.graph_module, op), nodes_by_op(compiled.graph_module, "softmax")
    want = torch.float32 if dtype == "float16" or fill < -torch.finfo(torch.bfloat16).max else torch.bfloat16
    assert record(node).dtype == want and record(node).rule == "range"
    assert record(node).reason.startswith(f"output holds the constant {float(fill):.6g} where it fills")
    assert record(softmax).dtype == want  # reading it: a cast to f16 would write -inf
    if want == torch.float32:  # (in bf16 it follows its input, which bf16 holds)
        assert record(softmax).reason.startswith(f"input %{node.name} holds the constant")
    x, mask = torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.long)
    mask[0, 3:] = 0
    mask[1, :] = 0  # every key masked: fp32 spreads the row's weight evenly (fp16's -inf: 0/0 = NaN)
    assert rel_err(compiled(x, mask), model(x, mask)) < TOL[torch.float16]


def test_bfloat16_has_fp32_range_so_the_range_rule_does_not_fire():
    gm = stages(Overflow().eval(), [torch.randn(16, 16) for _ in range(4)], upto="assign_precision", dtype="bfloat16")
    assert all(record(n).dtype == torch.bfloat16 for n in nodes_by_op(gm, "linear"))


def test_keep_fp32_by_module_path_and_op_name():
    gm = stages(Tiny().eval(), _tiny_data(), upto="assign_precision", keep_fp32=["fc2", "relu"])
    fc1, fc2 = nodes_by_op(gm, "linear")
    (relu,) = nodes_by_op(gm, "relu")
    assert record(fc1).dtype == torch.float16
    assert record(fc2).dtype == torch.float32 and record(fc2).reason == "keep_fp32 names 'fc2'"
    assert record(relu).dtype == torch.float32 and record(relu).rule == "keep_fp32"


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return torch.softmax(self.head(self.mlp(self.embed(x))), -1)


# keep_fp32="mlp": the plan (records only: parameters are converted later, by insert_casts) has every node of
# the kept module in f32, its gelu included; the rest in f16, the softmax on f16 I/O with fp32 math inside.
KEPT_MLP = """\
%embed_weight = param embed.weight : f32[32,16]
%embed_bias = param embed.bias : f32[32]
%mlp_0_weight = param mlp.0.weight : f32[32,32]
%mlp_0_bias = param mlp.0.bias : f32[32]
%mlp_2_weight = param mlp.2.weight : f32[32,32]
%mlp_2_bias = param mlp.2.bias : f32[32]
%head_weight = param head.weight : f32[4,32]
%head_bias = param head.bias : f32[4]
%x = input : f32[s0,16]
%linear = linear(%x, %embed_weight, %embed_bias) : f16[s0,32]
%linear_1 = linear(%linear, %mlp_0_weight, %mlp_0_bias) : f32[s0,32]  # f32
%gelu = gelu(%linear_1) : f32[s0,32]  # f32
%linear_2 = linear(%gelu, %mlp_2_weight, %mlp_2_bias) : f32[s0,32]  # f32
%linear_3 = linear(%linear_2, %head_weight, %head_bias) : f16[s0,4]
%softmax = softmax(%linear_3, -1) : f16[s0,4]  # f32
return (%softmax)"""


def test_keep_fp32_module_plans_its_nodes_f32_and_the_rest_f16():
    model, data = Blocks().eval(), [torch.randn(8, 16) for _ in range(3)]
    gm = stages(model, data, upto="assign_precision", keep_fp32=["mlp"])
    assert ir_lines(gm) == KEPT_MLP.splitlines()
    kept = [n for n in gm.graph.nodes if n.op == "call_function" and record(n).module_path.startswith("mlp")]
    assert [record(n).module_path for n in kept] == ["mlp.0", "mlp.1", "mlp.2"]
    assert {(record(n).rule, record(n).reason) for n in kept} == {(Rule.KEEP_FP32, "keep_fp32 names 'mlp'")}
    # the compiled graph realises the plan, and its numbers are fp32's
    lowered = stages(model, data, upto="eliminate_casts", keep_fp32=["mlp"])
    h, f = torch.float16, torch.float32
    assert [n.meta["val"].dtype for n in nodes_by_op(lowered, "linear")] == [h, f, f, h]
    x = torch.randn(32, 16)
    assert rel_err(lowered(x), model(x)) < TOL[torch.float16]


def test_keep_fp32_that_matches_nothing_is_an_error():
    with pytest.raises(mpcompiler.OptionError, match=r"\['decoder'\] match no module path.*'fc1'"):
        mpcompiler.compile(Tiny().eval(), _tiny_data(), keep_fp32="decoder")


def test_keep_fp32_module_numbers_match_fp32_closer():
    model = Tiny().eval()
    data = _tiny_data()
    x = torch.randn(64, 16)
    low = rel_err(mpcompiler.compile(model, data)(x), model(x))
    high = rel_err(mpcompiler.compile(model, data, keep_fp32=["fc1", "ln", "relu", "fc2", "softmax"])(x), model(x))
    assert high < 1e-6 < low < TOL[torch.float16]


def test_model_input_beyond_fp16_is_not_cast_down():
    model = Tiny().eval()
    data = [torch.randn(8, 16) * 1e5 for _ in range(2)]
    gm = stages(model, data, upto="assign_precision")
    fc1 = nodes_by_op(gm, "linear")[0]
    x_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert record(x_node).range.absmax > 65504
    assert record(fc1).dtype == torch.float32 and record(fc1).rule == "range"
    x = torch.randn(4, 16) * 1e5
    assert rel_err(mpcompiler.compile(model, data)(x), model(x)) < TOL[torch.float16]
