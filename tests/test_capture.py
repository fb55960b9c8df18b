"""Capture: sample forms, dynamic dims, and one clear error per bad input."""

import pytest
import torch
import torch.nn as nn

import mpcompiler
from mpcompiler.samples import as_sample, collect_samples
from tests.helpers import TOL, Tiny, rel_err


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, scale=None, *, bias=None):
        y = self.fc(x)
        if scale is not None:
            y = y * scale
        return {"y": y + (bias if bias is not None else 0), "pair": (y.sum(-1), x)}


def test_sample_forms():
    t = torch.randn(2, 3)
    assert as_sample(t, 0) == ((t,), {})
    assert as_sample([t, t], 0)[0] == (t, t)
    assert as_sample({"x": t}, 0) == ((), {"x": t})
    with pytest.raises(mpcompiler.CaptureError, match=r"sample 3 is a str; .* tokenizer\(text, return_tensors=.pt.\)"):
        as_sample("text", 3)


def test_generator_is_read_once_and_empty_or_single_inputs_are_errors():
    gen = (torch.randn(4, 16) for _ in range(3))
    assert len(collect_samples(gen)) == 3
    with pytest.raises(mpcompiler.CaptureError, match="empty"):
        collect_samples([])
    with pytest.raises(mpcompiler.CaptureError, match="wrap it in a list"):
        collect_samples(torch.randn(4, 16))
    with pytest.raises(mpcompiler.CaptureError, match="iterable"):
        collect_samples(42)


def test_positional_keyword_and_nested_outputs_keep_their_structure():
    model = TwoInputs().eval()
    data = [((torch.randn(4, 8), torch.randn(4, 8)), {}) for _ in range(2)]
    data = [(x, s) for (x, s), _ in data]
    compiled = mpcompiler.compile(model, data)
    x, s = torch.randn(3, 8), torch.randn(3, 8)
    got, ref = compiled(x, s), model(x, s)
    assert set(got) == {"y", "pair"} and isinstance(got["pair"], tuple)
    assert rel_err(got["y"], ref["y"]) < TOL[torch.float16]
    assert got["pair"][1] is not None and torch.equal(got["pair"][1], x)

    kw = mpcompiler.compile(model, [{"x": torch.randn(4, 8), "bias": torch.randn(4, 8)} for _ in range(2)])
    b = torch.randn(3, 8)
    assert rel_err(kw(x=x, bias=b)["y"], model(x, bias=b)["y"]) < TOL[torch.float16]


def test_wrong_input_is_named_as_forward_names_it_however_it_is_passed():
    model = TwoInputs().eval()
    compiled = mpcompiler.compile(model, [{"x": torch.randn(4, 8), "bias": torch.randn(4, 8)} for _ in range(2)])
    x, bad = torch.randn(3, 8), torch.randn(3, 9)
    for args, kwargs in [((), {"x": x, "bias": bad}), ((x,), {"bias": bad}), ((x, bad), {})]:
        with pytest.raises(mpcompiler.InputError, match=r"input bias has size 9 in dim 1, expected 8"):
            compiled(*args, **kwargs)
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'bias'"):  # left to forward()
        compiled(x=x)


def test_batch_dim_is_dynamic_and_varying_dims_too():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    compiled = mpcompiler.compile(model, [torch.randn(4, 5, 8), torch.randn(4, 7, 8)])
    for shape in [(1, 3, 8), (9, 11, 8)]:
        x = torch.randn(shape)
        assert rel_err(compiled(x), model(x)) < TOL[torch.float16]


def test_sizes_of_dynamic_dims_belong_to_no_module():
    # torch.export tags the nodes that read a dynamic dim's size with an internal hook's name
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x).reshape(x.shape[0], -1)

    compiled = mpcompiler.compile(Flat().eval(), [torch.randn(4, 5, 8), torch.randn(3, 7, 8)])
    paths = {d.op: d.module_path for d in compiled.report.nodes}
    assert paths["sym_size"] == "" and paths["linear"] == "fc"


def test_keyword_arguments_no_sample_passed_are_taken_at_their_default_value():
    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, use_cache=True, scale=None):
            return self.fc(x) if scale is None else self.fc(x) * scale

    model = Cached().eval()
    compiled = mpcompiler.compile(model, [torch.randn(4, 8), torch.randn(3, 8)])
    x = torch.randn(2, 8)
    assert rel_err(compiled(x, use_cache=True, scale=None), model(x)) < TOL[torch.float16]
    with pytest.raises(mpcompiler.InputError, match=r"use_cache=False: no calibration sample passed use_cache"):
        compiled(x, use_cache=False)
    with pytest.raises(mpcompiler.InputError, match="scale=tensor"):
        compiled(x, scale=torch.ones(8))


def test_batch_of_one_warns_that_the_batch_is_static():
    with pytest.warns(UserWarning, match="dim 0 of input input is static"):
        compiled = mpcompiler.compile(nn.Sequential(nn.Linear(8, 8)).eval(), [torch.randn(1, 8)])
    with pytest.raises(mpcompiler.InputError, match=r"input input has size 2 in dim 0, expected 1 \(static: the first"):
        compiled(torch.randn(2, 8))


class Pair(nn.Module):
    def forward(self, pair, scale):
        return pair[0] * scale + pair[1]


def test_wrong_input_inside_a_nested_argument_is_named_by_its_path():
    compiled = mpcompiler.compile(Pair(), [((torch.randn(4, 8), torch.randn(4, 8)), torch.randn(4, 8))] * 2)
    with pytest.raises(mpcompiler.InputError, match=r"input pair\[1\] has size 9 in dim 1, expected 8"):
        compiled((torch.randn(4, 8), torch.randn(4, 9)), torch.randn(4, 8))


class FixedView(nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], 2, 8) if x.shape[1] == 16 else x


def test_varying_dim_that_export_specializes_is_an_error_naming_the_input():
    with pytest.raises(mpcompiler.CaptureError, match=r"dim 1 of input x varies .*\[16, 32\]"):
        mpcompiler.compile(FixedView(), [torch.randn(2, 16), torch.randn(2, 32)])


def test_samples_of_different_structure_or_rank_are_errors():
    model = TwoInputs().eval()
    with pytest.raises(mpcompiler.CaptureError, match="sample 1 has a different structure"):
        mpcompiler.compile(model, [{"x": torch.randn(2, 8)}, {"x": torch.randn(2, 8), "bias": torch.randn(2, 8)}])
    with pytest.raises(mpcompiler.CaptureError, match="input x of calibration sample 1 has shape"):
        mpcompiler.compile(model, [torch.randn(2, 8), torch.randn(2, 3, 8)])
    with pytest.raises(mpcompiler.CaptureError, match="input x of val_data sample 1 has shape"):  # not "sample 3"
        mpcompiler.compile(model, [torch.randn(2, 8)] * 2, val_data=[torch.randn(2, 8), torch.randn(2, 3, 8)])


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_uncapturable_model_gets_one_error_with_a_hint():
    with pytest.raises(mpcompiler.CaptureError, match="could not capture DataDependent.*\nTry: .*branches on a tensor"):
        mpcompiler.compile(DataDependent(), [torch.randn(2, 4)])


def test_model_in_training_mode_is_captured_in_eval_and_left_as_it_was():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    assert model.training
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = mpcompiler.compile(model, [torch.randn(4, 8) for _ in range(2)])
    assert model.training
    for k, v in model.state_dict().items():
        assert v.dtype == weights[k].dtype and torch.equal(v, weights[k]), k
    x = torch.randn(5, 8)
    model.eval()
    assert rel_err(compiled(x), model(x)) < TOL[torch.float16]


def test_not_a_module_or_wrong_inputs():
    with pytest.raises(mpcompiler.CaptureError, match="must be a torch.nn.Module"):
        mpcompiler.compile(lambda x: x, [torch.randn(2)])
    with pytest.raises(mpcompiler.CaptureError, match="does not fit Tiny.forward"):
        mpcompiler.compile(Tiny(), [{"y": torch.randn(2, 16)}])
    labelled = [(torch.randn(2, 16), torch.tensor([0, 1]))]  # a DataLoader of (input, label) pairs
    with pytest.raises(mpcompiler.CaptureError, match=r"too many .* pass the inputs alone, \(x for x, _ in loader\)"):
        mpcompiler.compile(Tiny(), labelled)
