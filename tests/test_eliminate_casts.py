"""eliminate_casts: each rule fires where it may, never where it must not, and never changes a result."""

from collections import Counter

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpcompiler
from mpcompiler.ops import is_cast
from mpcompiler.passes import EliminateCasts
from tests.helpers import TOL, ir_lines, rel_err, run_pipeline, stages

H, F, B, D = torch.float16, torch.float32, torch.bfloat16, torch.float64


class Chains(nn.Module):
    def forward(self, x):
        keep = x.half().float()  # f32 -> f16 -> f32 rounds: must survive
        h = x.half()
        back = h.float().half()  # f16 -> f32 -> f16 is h
        dup1, dup2 = h.double(), h.double()  # one cast is enough
        return keep, back, dup1 + dup2


def _casts(gm):
    return [(n.args[0].name, n.args[1] if len(n.args) > 1 else n.kwargs["dtype"]) for n in gm.graph.nodes if is_cast(n)]


def test_rules_fire_where_safe_and_the_rounding_round_trip_survives():
    model = Chains()
    gm = stages(model, [torch.randn(4, 8)], upto="clean_graph")
    x = torch.randn(4, 8)
    before = gm(x)
    result = EliminateCasts().run(gm)
    # x.half() twice, h.float() twice (keep's and back's), h.double() twice: three duplicates;
    # back = h.float().half() -> h.half() (exact chain) -> h (identity)
    assert result.stats == {"identity": 1, "exact_chain": 1, "dead": 0, "duplicate": 3}
    assert _casts(gm) == [("x", H), ("to", F), ("to", D)]  # the f32 -> f16 -> f32 pair stays
    for a, b in zip(gm(x), before, strict=True):
        assert torch.equal(a, b)


class RoundTrip(nn.Module):
    def forward(self, x):
        h = x.half()
        return h.float().half() * 2


def test_inner_cast_left_without_readers_is_removed():
    gm = stages(RoundTrip(), [torch.randn(4, 8)], upto="clean_graph")
    result = EliminateCasts().run(gm)
    assert result.stats == {"identity": 1, "exact_chain": 1, "dead": 1, "duplicate": 0}
    assert _casts(gm) == [("x", H)]


class HalfBlock(nn.Module):
    """A model with an fp16 part: its .float() widens on purpose."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8).half()
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x.half()).float()
        return self.out(torch.exp(y * 0.1))


def test_user_widening_cast_is_kept():
    model = HalfBlock().eval()
    compiled = mpcompiler.compile(model, [torch.randn(4, 8) for _ in range(2)])
    gm = compiled.graph_module
    widen = [n for n in gm.graph.nodes if is_cast(n) and n.args[0].name == "linear"]
    assert len(widen) == 1 and widen[0].args[1] == F
    x = torch.randn(3, 8)
    assert rel_err(compiled(x), model(x)) < TOL[torch.float16]


class HalfPartWidened(nn.Module):
    """The model's own fp16 part, widened on purpose: the sum reads the widened value in fp32, the next linear
    (fp16 in the plan) reads it back in fp16, through a cast insert_casts adds."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8).half()
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        wide = self.fc(x.half()).float()
        return self.out(wide), wide.sum(-1)


# after insert_casts: the model's own casts (`to`), and the cast of its widened value back to f16 for %out
BEFORE = """\
%fc_weight = param fc.weight : f16[8,8]
%fc_bias = param fc.bias : f16[8]
%out_weight = param out.weight : f16[4,8]
%out_bias = param out.bias : f16[4]
%x = input : f32[s0,8]
%to = to(%x, f16) : f16[s0,8]
%linear = linear(%to, %fc_weight, %fc_bias) : f16[s0,8]
%to_1 = to(%linear, f32) : f32[s0,8]
%to_1_f16 = cast(%to_1) {to=f16} : f16[s0,8]
%linear_1 = linear(%to_1_f16, %out_weight, %out_bias) : f16[s0,4]
%linear_1_f32 = cast(%linear_1) {to=f32} : f32[s0,4]
%sum_1 = sum(%to_1, [-1]) : f32[s0]  # f32
return (%linear_1_f32, %sum_1)"""

# f16 -> f32 -> f16 is the identity: %out reads %linear itself (exact chain, then identity). The casts that
# change values stay: the model's rounding of x, its widening (the sum still reads it), the output's cast.
EXPECTED = """\
%fc_weight = param fc.weight : f16[8,8]
%fc_bias = param fc.bias : f16[8]
%out_weight = param out.weight : f16[4,8]
%out_bias = param out.bias : f16[4]
%x = input : f32[s0,8]
%to = to(%x, f16) : f16[s0,8]
%linear = linear(%to, %fc_weight, %fc_bias) : f16[s0,8]
%to_1 = to(%linear, f32) : f32[s0,8]
%linear_1 = linear(%linear, %out_weight, %out_bias) : f16[s0,4]
%linear_1_f32 = cast(%linear_1) {to=f32} : f32[s0,4]
%sum_1 = sum(%to_1, [-1]) : f32[s0]  # f32
return (%linear_1_f32, %sum_1)"""


def test_a_cast_pair_that_cancels_goes_and_the_casts_that_round_or_widen_stay():
    model = HalfPartWidened().eval()
    gm = stages(model, [torch.randn(4, 8) for _ in range(2)], upto="insert_casts")
    assert ir_lines(gm) == BEFORE.splitlines()
    x = torch.randn(16, 8)
    before = gm(x)
    result = EliminateCasts().run(gm)
    assert result.stats == {"identity": 1, "exact_chain": 1, "dead": 0, "duplicate": 0}
    assert ir_lines(gm) == EXPECTED.splitlines()
    for got, was, ref in zip(gm(x), before, model(x), strict=True):
        assert torch.equal(got, was)  # the rules are exact
        assert rel_err(got, ref) < TOL[torch.float16]


class RoundsOnPurpose(nn.Module):
    def forward(self, x):
        return x.half().float() * 2  # f32 -> f16 -> f32: the model rounds x to f16 values


def test_a_rounding_round_trip_stays_and_each_rule_says_why():
    gm, results = run_pipeline(RoundsOnPurpose(), [torch.randn(4, 8) for _ in range(2)], upto="eliminate_casts")
    result = results["eliminate_casts"]
    assert not result.modified and [line for line in ir_lines(gm) if "to(" in line] == [
        "%to = to(%x, f16) : f16[s0,8]",
        "%to_1 = to(%to, f32) : f32[s0,8]",
    ]
    # two casts, each tried by each rule once (nothing fired, so one sweep)
    assert result.reasons == {
        "identity": Counter({"changes dtype": 2}),
        "exact_chain": Counter({"input is not a cast": 1, "inner cast f32 -> f16 rounds": 1}),
        "dead": Counter({"has users": 2}),
        "duplicate": Counter({"the first cast of its value to its dtype": 2}),
    }
    x = torch.randn(4, 8)
    assert torch.equal(gm(x), RoundsOnPurpose()(x))


_STEP = st.one_of(st.sampled_from([H, F, B, D]), st.sampled_from(["add", "mul", "relu", "neg"]))


class Program(nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def forward(self, x):
        outs = []
        for s in self.steps:
            if isinstance(s, torch.dtype):
                x = x.to(s)
            elif s == "add":
                x = x + 1.5
            elif s == "mul":
                x = x * 0.37
            elif s == "relu":
                x = torch.relu(x)
            else:
                x = -x
            outs.append(x)
        return tuple(outs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(_STEP, min_size=2, max_size=7))
def test_property_elimination_never_changes_a_result(steps):
    gm = stages(Program(steps), [torch.randn(3, 5)], upto="clean_graph")
    x = torch.randn(3, 5) * 100
    before = gm(x)
    EliminateCasts().run(gm)
    after = gm(x)
    for a, b in zip(after, before, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
