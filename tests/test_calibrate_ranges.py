"""calibrate_ranges: exact statistics on known values, merged over samples; errors name node and sample."""

import pytest
import torch
import torch.nn as nn
import transformers

import mpcompiler
from mpcompiler.ir import record
from mpcompiler.passes.calibrate_ranges import _Stats
from tests.helpers import TOL, Tiny, nodes_by_op, stages


def test_stats_of_known_values():
    st = _Stats()
    st.update(torch.tensor([-3.0, 0.0, 1e-6, 2.0, float("nan"), float("inf")]))
    st.update(torch.tensor([5.0, -1e-5, 0.5]))
    r = st.finish()
    assert (r.min, r.max, r.absmax) == (-3.0, 5.0, 5.0)
    assert (r.nan, r.inf, r.samples) == (1, 1, 2)
    assert r.subnormal_share == pytest.approx(2 / 6)  # 1e-6 and 1e-5 of six nonzero finite values


def test_percentile_within_a_bin():
    st = _Stats()
    values = torch.logspace(-3, 3, 100_000)  # |x| spread over six decades
    st.update(values)
    exact = float(torch.quantile(values, 0.9999))
    assert exact <= st.finish().p9999 <= exact * 2 ** (1 / 4) * 1.0001


def test_the_percentile_is_at_most_the_largest_value():
    st = _Stats()
    st.update(torch.full((1000,), 3.0))  # every value in one histogram bin, whose upper edge is past 3
    r = st.finish()
    assert r.p9999 == r.absmax == 3.0


def test_statistics_of_two_halves_merge_into_those_of_the_whole():
    torch.manual_seed(0)
    samples = [torch.randn(50) * 10**i for i in range(-3, 3)] + [torch.tensor([0.0, float("nan"), 1e-6])]
    whole, first, second = _Stats(), _Stats(), _Stats()
    for i, x in enumerate(samples):
        whole.update(x)
        (first if i % 2 else second).update(x)
    assert first.merge(second).finish() == whole.finish()
    assert torch.equal(first.hist, whole.hist)


def test_large_tensors_are_histogrammed_on_a_sample():
    st = _Stats()
    x = torch.randn(3_000_000)
    st.update(x)
    r = st.finish()
    assert r.absmax == float(x.abs().max())
    assert 3.0 < r.p9999 < 5.5  # |N(0,1)|'s 99.99th percentile is 3.9


def test_ranges_cover_all_samples_and_views_share_their_input():
    model = Tiny().eval()
    data = [torch.randn(4, 16), torch.randn(4, 16) * 10]
    gm = stages(model, data, upto="calibrate_ranges")
    fc1 = nodes_by_op(gm, "linear")[0]
    with torch.no_grad():
        outs = [model.fc1(x) for x in data]
    r = record(fc1).range
    assert r.max == pytest.approx(max(float(o.max()) for o in outs), rel=1e-6)
    assert r.min == pytest.approx(min(float(o.min()) for o in outs), rel=1e-6)
    assert r.samples == 2
    weight = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "fc1.weight")
    assert record(weight).range.absmax == pytest.approx(float(model.fc1.weight.detach().abs().max()))


class NaNAfterLog(nn.Module):
    def forward(self, x):
        return torch.log(x - 1.0) * 2


def test_nan_output_names_the_first_nan_node_and_sample():
    with pytest.raises(mpcompiler.CalibrationError, match=r"sample 1; the first NaN appears at %log \(log\)"):
        mpcompiler.compile(NaNAfterLog(), [torch.rand(2, 4) + 2, torch.rand(2, 4)])


class Scale(nn.Module):
    def forward(self, x):
        return x * 1e38  # fp32's max is 3.4e38: |x| > 3.4 overflows to inf


def test_inf_output_is_named_inf_not_nan():
    with pytest.raises(mpcompiler.CalibrationError) as info:
        mpcompiler.compile(Scale(), [torch.ones(2, 4), torch.full((2, 4), 10.0)])
    message = str(info.value)
    assert "gives inf in its outputs on calibration sample 1; the first inf appears at %mul (mul)" in message
    assert "NaN" not in message


class Normalize(nn.Module):
    def forward(self, x):
        return torch.nn.functional.layer_norm(x, (4,))


def test_inf_in_a_sample_is_named_with_the_nan_it_causes():
    with pytest.raises(
        mpcompiler.CalibrationError,
        match=r"gives NaN in its outputs on calibration sample 1; the first inf appears at input %x "
        r"and the first NaN appears at %layer_norm \(layer_norm\)",
    ):
        mpcompiler.compile(Normalize(), [torch.randn(2, 4), torch.tensor([[1.0, float("inf"), 0.0, 2.0]] * 2)])


def test_sample_that_fails_names_the_sample_and_node():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    ids = [torch.randint(0, 10, (2, 5)), torch.tensor([[1, 2, 50, 3, 4]] * 2)]  # id 50: past the vocabulary
    with pytest.raises(
        mpcompiler.CalibrationError, match=r"sample 1 failed at %embedding \(embedding\) in 0: IndexError"
    ):
        mpcompiler.compile(model, ids)


def _ranges(compiled) -> dict:
    return {n.name: (n.range, n.inner) for n in compiled.report.nodes if n.range is not None}


def test_statistics_calibrated_in_two_processes_merge_into_those_of_all_samples(tmp_path):
    torch.manual_seed(0)
    model = Tiny().eval()
    samples = [torch.randn(b, 16) * s for b, s in ((4, 1), (2, 10), (3, 0.1), (4, 3), (2, 1), (5, 30))]
    val = [torch.randn(4, 16)]
    whole = mpcompiler.compile(model, samples, val_data=val)
    # two "processes" calibrate a part each and save; a third loads, merges and compiles with its own part
    mpcompiler.calibrate(model, samples[:2]).save(tmp_path / "a.pt")
    mpcompiler.calibrate(model, samples[2:4]).save(tmp_path / "b.pt")
    merged = mpcompiler.Calibration.load(tmp_path / "a.pt").merge(mpcompiler.Calibration.load(tmp_path / "b.pt"))
    assert merged.samples == 4
    parts = mpcompiler.compile(model, samples[4:], val_data=val, calibration=merged)
    assert _ranges(parts) == _ranges(whole) and len(_ranges(whole)) >= 6
    assert parts.report.calib_samples == whole.report.calib_samples == 6
    assert torch.equal(parts(val[0]), whole(val[0]))  # the same ranges, the same plan


def test_statistics_of_another_model_or_file_are_refused(tmp_path):
    other = mpcompiler.calibrate(nn.Sequential(nn.Linear(16, 4)), [torch.randn(2, 16)])
    with pytest.raises(mpcompiler.CalibrationError, match=r"of another graph: value %\w+ is .* Calibrate the same"):
        mpcompiler.compile(Tiny().eval(), [torch.randn(2, 16)], calibration=other)
    # the same value names and ops, another width: the shapes tell them apart
    with pytest.raises(mpcompiler.CalibrationError, match=r"value %linear is linear float32\[\w+, 4\] there and "):
        mpcompiler.compile(nn.Sequential(nn.Linear(16, 256)), [torch.randn(2, 16)], calibration=other)
    (tmp_path / "not.pt").write_text("hello")
    with pytest.raises(mpcompiler.CalibrationError, match="not.pt is not calibration statistics"):
        mpcompiler.Calibration.load(tmp_path / "not.pt")
    with pytest.raises(IsADirectoryError, match="a folder: give the path of the file to write in it"):
        other.save(tmp_path)  # the rename's own error named the temporary file
    with pytest.raises(mpcompiler.OptionError, match=r"takes what mpcompiler.calibrate\(\) returns; got dict"):
        mpcompiler.compile(Tiny().eval(), [torch.randn(2, 16)], calibration={"fc1": 1.0})


def test_processes_whose_samples_vary_in_other_dims_capture_alike_with_dynamic():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                  vocab_size=50)  # fmt: skip
    model = transformers.BertModel(cfg).eval()

    def sample(seq):
        return {"input_ids": torch.randint(0, 50, (2, seq)), "attention_mask": torch.ones(2, seq, dtype=torch.long)}

    varying, fixed = [sample(8), sample(12)], [sample(8), sample(8)]
    a = mpcompiler.calibrate(model, varying)  # the sequence dim varies here, not in the other process
    with pytest.raises(mpcompiler.CalibrationError, match=r"other dynamic dims .* union: .*'input_ids': \[1\]"):
        a.merge(mpcompiler.calibrate(model, fixed))
    dims = {"input_ids": [1], "attention_mask": [1]}
    merged = a.merge(mpcompiler.calibrate(model, fixed, dynamic=dims))
    compiled = mpcompiler.compile(model, [sample(8)], val_data=[sample(10)], calibration=merged)
    assert compiled.report.calib_samples == 5 and compiled.report.accuracy.max < TOL[torch.float16]
