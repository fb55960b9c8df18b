"""insert_casts: casts only at boundaries, parameters converted once, numbers against fp32."""

import pytest
import torch
import torch.nn as nn

import mpcompiler
from mpcompiler.ir import record
from tests.helpers import TOL, Tiny, ir_lines, nodes_by_op, rel_err, stages


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiny_casts_at_boundaries_only_and_matches_fp32(dtype):
    model = Tiny().eval()
    data = [torch.randn(8, 16) for _ in range(3)]
    gm = stages(model, data, upto="insert_casts", dtype=dtype)
    casts = [n for n in gm.graph.nodes if n.op == "call_function" and record(n).inserted]
    assert [(c.args[0].name, c.kwargs["dtype"]) for c in casts] == [("x", dtype), ("softmax", torch.float32)]
    for name, p in gm.named_parameters():
        assert p.dtype == dtype, name
    x = torch.randn(32, 16)
    out = gm(x)
    assert out.dtype == torch.float32
    assert rel_err(out, model(x)) < TOL[dtype]


class LinearNormLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)))


# The graph insert_casts must leave (statement : planned type, ``# f32`` where the dump says why): the linears
# in the low dtype {lo}, layer_norm on {lo} I/O with fp32 math inside (no cast island around it), one cast of
# the input where the first linear reads it, the parameters converted in place, the output cast back to f32.
LOW_THROUGHOUT = """\
%fc1_weight = param fc1.weight : {lo}[32,16]
%fc1_bias = param fc1.bias : {lo}[32]
%ln_weight = param ln.weight : {lo}[32]
%ln_bias = param ln.bias : {lo}[32]
%fc2_weight = param fc2.weight : {lo}[4,32]
%fc2_bias = param fc2.bias : {lo}[4]
%x = input : f32[s0,16]
%x_{lo} = cast(%x) {{to={lo}}} : {lo}[s0,16]
%linear = linear(%x_{lo}, %fc1_weight, %fc1_bias) : {lo}[s0,32]
%layer_norm = layer_norm(%linear, [32], %ln_weight, %ln_bias, 1e-05, False) : {lo}[s0,32]  # f32
%linear_1 = linear(%layer_norm, %fc2_weight, %fc2_bias) : {lo}[s0,4]
%linear_1_f32 = cast(%linear_1) {{to=f32}} : f32[s0,4]
return (%linear_1_f32)"""

# keep_fp32="ln": the norm and its parameters in f32, a cast on each side of it, each right after its value
LN_KEPT_FP32 = """\
%fc1_weight = param fc1.weight : f16[32,16]
%fc1_bias = param fc1.bias : f16[32]
%ln_weight = param ln.weight : f32[32]
%ln_bias = param ln.bias : f32[32]
%fc2_weight = param fc2.weight : f16[4,32]
%fc2_bias = param fc2.bias : f16[4]
%x = input : f32[s0,16]
%x_f16 = cast(%x) {to=f16} : f16[s0,16]
%linear = linear(%x_f16, %fc1_weight, %fc1_bias) : f16[s0,32]
%linear_f32 = cast(%linear) {to=f32} : f32[s0,32]
%layer_norm = layer_norm(%linear_f32, [32], %ln_weight, %ln_bias, 1e-05, False) : f32[s0,32]  # f32
%layer_norm_f16 = cast(%layer_norm) {to=f16} : f16[s0,32]
%linear_1 = linear(%layer_norm_f16, %fc2_weight, %fc2_bias) : f16[s0,4]
%linear_1_f32 = cast(%linear_1) {to=f32} : f32[s0,4]
return (%linear_1_f32)"""


@pytest.mark.parametrize(
    "options,expected",
    [
        ({}, LOW_THROUGHOUT.format(lo="f16")),
        ({"dtype": "bfloat16"}, LOW_THROUGHOUT.format(lo="bf16")),
        ({"keep_fp32": ["ln"]}, LN_KEPT_FP32),
    ],
    ids=["f16", "bf16", "ln kept fp32"],
)
def test_linear_norm_linear_casts_where_expected_and_matches_fp32(options, expected):
    model = LinearNormLinear().eval()
    gm = stages(model, [torch.randn(8, 16) for _ in range(3)], upto="insert_casts", **options)
    assert ir_lines(gm) == expected.splitlines()
    x = torch.randn(32, 16)
    dtype = torch.bfloat16 if options.get("dtype") == "bfloat16" else torch.float16
    assert rel_err(gm(x), model(x)) < TOL[dtype]


class SharedInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.rand(8))

    def forward(self, x):
        # x feeds two fp16 linears (one cast); scale feeds an fp16 mul and an fp32 exp (two dtypes)
        return self.a(x) * self.scale + self.b(x) + torch.exp(self.scale).sum()


def test_one_cast_per_value_and_dtype_and_parameter_in_two_dtypes():
    model = SharedInput().eval()
    gm = stages(model, [torch.randn(4, 8) for _ in range(2)], upto="insert_casts")
    casts_of_x = [n for n in gm.graph.nodes if record(n).inserted and n.args[0].name == "x"]
    assert len(casts_of_x) == 1 and len(casts_of_x[0].users) == 2
    assert gm.scale.dtype == torch.float32 and gm.scale_f16.dtype == torch.float16
    (exp,) = nodes_by_op(gm, "exp")
    assert exp.args[0].target == "scale"
    x = torch.randn(5, 8)
    assert rel_err(gm(x), model(x)) < TOL[torch.float16]


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        with torch.no_grad():
            self.bn.running_var.uniform_(1e-5, 1e-4)  # subnormal in fp16: must stay fp32
            self.bn.running_mean.normal_()

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))  # after a relu: not folded into the conv


def test_batch_norm_parameters_stay_fp32_with_fp16_io():
    model = ConvBN().eval()
    gm = stages(model, [torch.randn(2, 3, 8, 8) for _ in range(2)], upto="insert_casts")
    assert gm.conv.weight.dtype == torch.float16
    assert gm.bn.running_var.dtype == gm.bn.weight.dtype == torch.float32
    (bn,) = nodes_by_op(gm, "batch_norm")
    assert record(bn).dtype == torch.float16 and record(bn).math_dtype == torch.float32
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(gm(x), model(x)) < TOL[torch.float16]


def test_weights_take_half_the_bytes_and_user_model_is_untouched():
    model = Tiny().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = mpcompiler.compile(model, [torch.randn(8, 16)] * 2)
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert nbytes(compiled.graph_module) * 2 == nbytes(model)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k])


def test_compiled_module_owns_its_weights():
    model = SharedInput().eval()
    compiled = mpcompiler.compile(model, [torch.randn(4, 8) for _ in range(2)])
    model_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(t.untyped_storage().data_ptr() in model_storage for t in compiled.graph_module.state_dict().values())
    x = torch.randn(3, 8)
    before = compiled(x)
    with torch.no_grad():
        model.scale.mul_(3)  # the user edits the model afterwards: the artifact does not change
    assert torch.equal(compiled(x), before)
