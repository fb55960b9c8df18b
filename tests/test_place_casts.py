"""place_casts: the cast min-cut casts fewer bytes than graph-order propagation, and stays accurate."""

import pytest
import torch
import torch.nn as nn

import mpcompiler
import mpcompiler.api as api
from mpcompiler.ir import OpClass, op_name, planned_dtype, record
from mpcompiler.passes import PlaceCasts
from mpcompiler.passes.place_casts import cast_bytes, place
from tests.helpers import nodes_by_op, rel_err, stages

F16, F32 = torch.float16, torch.float32


def _without_and_with_placement(model, data, monkeypatch):
    """The model compiled without place_casts (graph-order propagation only), then as it is."""
    full = api.pipeline
    monkeypatch.setattr(api, "pipeline", lambda *a, **k: [p for p in full(*a, **k) if not isinstance(p, PlaceCasts)])
    plain = mpcompiler.compile(model, data)
    monkeypatch.undo()
    return plain, mpcompiler.compile(model, data)


def _casts(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and record(n).inserted]


class FanOut(nn.Module):
    """An fp32 op's value feeding three elementwise branches into fp16 linears, and a hand-written RMSNorm.

    Graph order runs each branch in fp32 and casts three times where one cast of exp's value will do;
    and the norm's ``x * rsqrt(...)`` mixes dtypes, so it runs in fp32 with x cast up and the product
    cast back, where casting the [B, 1] scale down is enough.
    """

    def __init__(self, d=64):
        super().__init__()
        self.fc0, self.fc1, self.fc2, self.fc3 = (nn.Linear(d, d) for _ in range(4))
        self.norm_weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        e = torch.exp(x.clamp(max=3))  # fp32 op
        h = self.fc1(torch.relu(e)) + self.fc2(torch.tanh(e)) + self.fc3(torch.sigmoid(e))
        h = h + self.fc0(x)
        rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)  # pow and rsqrt: fp32
        return self.head(rms * self.norm_weight)


def test_min_cut_casts_fewer_bytes_than_graph_order_and_matches_fp32(monkeypatch):
    torch.manual_seed(0)
    model = FanOut().eval()
    data = [torch.randn(16, 64) for _ in range(8)]
    plain, placed = _without_and_with_placement(model, data, monkeypatch)
    (stats,) = [p for p in placed.report.passes if p["name"] == "place_casts"]
    # graph order: x to f16, relu/tanh/sigmoid each to f16, h up for the norm (pow and mul share it),
    # the norm's product down, the output: 7 casts; the cut: x, exp's value (one cast for three
    # branches), h up for pow, the [B, 1] scale down, the output: 5
    assert (plain.report.casts(), placed.report.casts()) == (7, 5)
    assert stats["bytes_cast_after"] < stats["bytes_cast_before"]
    assert stats["bytes_cast_after"] <= stats["bytes_cast_before"] * 3 / 4
    moved = {n.name: n.dtype for n in placed.report.nodes if n.rule == "placement"}
    assert moved == dict.fromkeys(["relu", "tanh", "sigmoid", "mul", "mul_1"], "float16")
    assert all("fewer bytes cast than in f32" in n.reason for n in placed.report.nodes if n.rule == "placement")
    assert placed.report.accuracy.held_out and placed.report.accuracy.max < 1e-3
    x = torch.randn(32, 64)
    assert rel_err(placed(x), model(x)) < 1e-3


def test_cast_bytes_estimates_the_plan_and_place_is_callable_from_another_pass():
    torch.manual_seed(0)
    model = FanOut().eval()
    gm = stages(model, [torch.randn(16, 64) for _ in range(2)], upto="assign_precision")
    before = cast_bytes(gm)
    stats = place(gm)
    assert stats["bytes_cast_before"] == before and stats["bytes_cast_after"] == cast_bytes(gm) < before
    again = place(gm)  # moved nodes stay free: the cut of a placed plan is the plan
    assert again["free"] == stats["free"] and again["moved"] == again["changed"] == 0
    # 16x64 elements read as f32 and written as f16: 6 bytes each
    (exp,) = nodes_by_op(gm, "exp")
    assert cast_bytes(gm) >= 16 * 64 * 6 and record(exp).dtype == F32


class ViewBetween(nn.Module):
    """Data movement between two fp16 linears; an fp32 op's value is added in just before it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = self.fc1(x) + torch.exp(x.clamp(max=3))  # mixed: graph order runs the add in fp32
        h = h.view(-1, 8, 8).permute(0, 2, 1).reshape(-1, 64)
        return self.fc2(h)


_MOVES = ("view", "permute", "transpose", "reshape", "_unsafe_view", "clone")


def _no_cast_pair_around_data_movement(gm):
    for n in gm.graph.nodes:
        if n.op == "call_function" and record(n).op_class is OpClass.FOLLOW and record(n).rule != "cast":
            cast_in = any(record(a).inserted for a in n.all_input_nodes)
            cast_out = n.users and all(record(u).inserted for u in n.users)
            assert not (cast_in and cast_out), f"casts around %{n.name}"


def test_data_movement_between_fp16_linears_runs_fp16_with_no_cast_pair(monkeypatch):
    torch.manual_seed(0)
    model = ViewBetween().eval()
    data = [torch.randn(8, 64) for _ in range(6)]
    plain, placed = _without_and_with_placement(model, data, monkeypatch)
    gm = placed.graph_module
    moves = [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) in _MOVES]
    assert moves and all(planned_dtype(n) == F16 for n in moves)
    _no_cast_pair_around_data_movement(gm)
    # graph order: x to f16, the fc1 output up to f32, the reshaped value back down; the cut: x to f16,
    # exp's value down to f16 (the add runs f16)
    assert (plain.report.casts(), placed.report.casts()) == (4, 3)
    assert placed.report.accuracy.max < 1e-3


class Sandwich(nn.Module):
    """view between two ops of one class: between linears (low), between exp and log (fp32)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        low = self.fc2(self.fc1(x).view(-1, 4, 4).transpose(1, 2).reshape(-1, 16))
        high = torch.log(torch.exp(x.clamp(max=3)).view(-1, 4, 4).transpose(1, 2).reshape(-1, 16))
        return low + high


def _moves_after(node):
    """The chain of data-movement nodes reading ``node``, one after another."""
    out = []
    while len(node.users) == 1 and op_name(next(iter(node.users))) in _MOVES:
        node = next(iter(node.users))
        out.append(node)
    return out


@pytest.mark.parametrize("start", [F16, F32])
def test_a_view_takes_the_dtype_of_its_neighbours_whatever_the_plan_said(start):
    gm = stages(Sandwich().eval(), [torch.randn(4, 16) for _ in range(2)], upto="assign_precision")
    low, high = _moves_after(nodes_by_op(gm, "linear")[0]), _moves_after(nodes_by_op(gm, "exp")[0])
    assert len(low) == len(high) == 3
    for n in low + high:  # a plan with every view in one dtype
        record(n).dtype = start
    place(gm)
    assert [record(n).dtype for n in low + high] == [F16] * 3 + [F32] * 3
    assert all(record(n).rule == "placement" for n in low + high if record(n).dtype != start)


class BigBranches(nn.Module):
    """exp's value scaled past fp16's range, then scaled back down into two fp16 linears.

    Without the range rule the cut would cast exp's value once and run the scaling in fp16; its
    values reach ~6e5, so it stays fp32 and each branch is cast on its own.
    """

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 8), nn.Linear(32, 8)

    def forward(self, x):
        big = torch.exp(x.clamp(-3, 3)) * 3e4
        return self.fc1(big * 1e-5) + self.fc2(big * 2e-5)


def test_a_free_node_out_of_fp16_range_stays_fp32_though_the_cut_prefers_fp16():
    torch.manual_seed(0)
    model = BigBranches().eval()
    data = [torch.randn(8, 32) for _ in range(6)]
    gm = stages(model, data[:2], upto="assign_precision")
    big, small1, small2 = nodes_by_op(gm, "mul")
    unconstrained = place(gm, margin=1e-6)  # a margin that lets any range fit: the cut goes low
    assert record(big).dtype == F16 and unconstrained["bytes_cast_after"] < unconstrained["bytes_cast_before"]

    gm = stages(model, data[:2], upto="assign_precision")
    big, small1, small2 = nodes_by_op(gm, "mul")
    place(gm)
    assert record(big).dtype == F32 and record(big).rule == "range" and "past f16's max" in record(big).reason
    assert record(small1).dtype == record(small2).dtype == F32  # their input is past the range too

    compiled = mpcompiler.compile(model, data)
    assert compiled.report.accuracy.max < 1e-3
    x = torch.randn(16, 32)
    out = compiled(x)
    assert torch.isfinite(out).all() and rel_err(out, model(x)) < 1e-3


def test_ties_go_low():
    """exp -> relu -> linear: casting before or after relu moves as many bytes; relu runs fp16."""

    class Tie(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(torch.relu(torch.exp(x.clamp(max=3))))

    gm = stages(Tie().eval(), [torch.randn(4, 16) for _ in range(2)], upto="place_casts")
    (relu,) = nodes_by_op(gm, "relu")
    assert record(relu).dtype == F16 and record(relu).rule == "placement"
    assert "ties go to f16" in record(relu).reason


class Float64Island(nn.Module):
    """An f64 region written in the program: nodes touching it keep their plan."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        d = torch.relu(self.fc1(x).double())  # relu follows its f64 input
        return self.fc2(torch.tanh(d).float() + torch.exp(x.clamp(max=3)))


def test_nodes_touching_other_dtypes_keep_their_plan():
    torch.manual_seed(0)
    model = Float64Island().eval()
    data = [torch.randn(4, 16) for _ in range(5)]
    gm = stages(model, data[:2], upto="assign_precision")
    plan = {n: record(n).dtype for n in gm.graph.nodes}
    place(gm)
    for op in ("relu", "tanh"):
        (n,) = nodes_by_op(gm, op)
        assert record(n).dtype == plan[n] == torch.float64 and record(n).rule == "follows inputs"
    (add,) = nodes_by_op(gm, "add")
    assert record(add).dtype == F32  # two fp32 inputs, one fp16 reader: one cast after it is cheapest
    compiled = mpcompiler.compile(model, data)
    assert compiled.report.accuracy.max < 1e-3


class Chunks(nn.Module):
    """A tuple (chunk's list) cannot be cast: its getitems move with it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(16, 16)

    def forward(self, x):
        a, b = torch.exp(x.clamp(max=3)).chunk(2, dim=-1)  # fp32 op, then a list of two values
        c, d = self.fc3(x).chunk(2, dim=-1)  # fp16 op
        return self.fc1(a) + self.fc2(b) + torch.log(torch.cat([c, d], -1).abs() + 1).sum(-1, keepdim=True)


def test_tuple_values_move_with_their_readers():
    torch.manual_seed(0)
    model = Chunks().eval()
    data = [torch.randn(4, 16) for _ in range(5)]
    gm = stages(model, data[:3], upto="insert_casts")  # debug: every node computes its planned dtype
    for chunk in nodes_by_op(gm, "chunk"):
        assert {planned_dtype(g) for g in chunk.users} == {planned_dtype(chunk)}
    (chunk, _) = nodes_by_op(gm, "chunk")
    assert all("a tuple, which cannot be cast" in record(g).reason for g in chunk.users)
    assert mpcompiler.compile(model, data).report.accuracy.max < 1e-3
