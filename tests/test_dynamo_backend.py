"""torch.compile(model, backend=mpcompiler.backend(calib)): each captured graph compiled by mpcompiler, its
weights converted once, calibrated on the samples given once, numbers checked against fp32."""

import pytest
import torch
import torch.nn as nn
import transformers

import mpcompiler
from tests.helpers import TOL


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)
        self.register_buffer("shift", torch.full((4,), 0.5))

    def forward(self, x):
        return (self.fc2(torch.relu(self.fc1(x))) + self.shift).softmax(-1)


class Broken(MLP):
    def forward(self, x):
        h = torch.relu(self.fc1(x))
        torch._dynamo.graph_break()
        return self.fc2(h)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model):
    """``model`` under torch.compile with the backend, calibrated on ten [8, 16] samples; and the backend."""
    backend = mpcompiler.backend([torch.randn(8, 16) for _ in range(10)])
    return torch.compile(model, backend=backend, dynamic=False), backend


def test_the_captured_graph_runs_mpcompilers_plan():
    torch.manual_seed(0)
    model = MLP().eval()
    fast, backend = _compiled(model)
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert _rel(fast(x), model(x)) < TOL[torch.float16]
        fast(torch.randn(8, 16))  # same shapes: no recompilation
    (compiled,) = backend.compiled
    report = compiled.report
    assert report.counts("low") == {"float16": 2} and (report.calib_samples, report.accuracy.samples) == (8, 2)
    # the weights are the graph's own (converted once), not inputs cast on every call
    assert {p.dtype for p in compiled.graph_module.parameters()} == {torch.float16}
    three = torch.randn(3, 16)
    with torch.no_grad():
        assert _rel(fast(three), model(three)) < TOL[torch.float16]
    assert len(backend.compiled) == 2  # a new shape: dynamo recompiles, mpcompiler compiles again


def test_keyword_inputs_of_a_hugging_face_model():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    bert = transformers.BertModel(cfg).eval()

    def sample():
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 9:] = 0
        return {"input_ids": torch.randint(0, 200, (2, 12)), "attention_mask": mask}

    samples = [transformers.BatchEncoding(sample()) for _ in range(10)]  # a tokenizer's output
    backend = mpcompiler.backend(samples, keep_fp32="encoder.layer.1")
    fast = torch.compile(bert, backend=backend, dynamic=False)
    x = sample()
    with torch.no_grad():
        got, want = fast(**x).last_hidden_state, bert(**x).last_hidden_state
    assert _rel(got, want) < TOL[torch.float16] and len(backend.compiled) == 1
    # the model's module paths (dynamo names them L['self'].encoder.layer[1]...): keep_fp32 finds them
    linears = {n.module_path: n.dtype for n in backend.compiled[0].report.nodes if n.op == "linear"}
    assert linears["encoder.layer.0.attention.self.query"] == "float16"
    assert linears["encoder.layer.1.attention.self.query"] == "float32"


def test_by_name_with_options(tmp_path):
    torch.manual_seed(0)
    model = MLP().eval()
    calib = [torch.randn(8, 16) for _ in range(10)]
    options = {"calib_data": calib, "tolerance": 1e-3, "dump_dir": str(tmp_path)}
    fast = torch.compile(model, backend="mpcompiler", options=options, dynamic=False)
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert _rel(fast(x), model(x)) < TOL[torch.float16]
    assert (tmp_path / "report.json").is_file()  # the report of the string form: in dump_dir
    with pytest.raises(Exception, match="backend='mpcompiler' needs calibration data"):
        with torch.no_grad():
            torch.compile(MLP().eval(), backend="mpcompiler", options={"tolerance": 1e-3})(x)
    with pytest.raises(Exception, match=r"give compile\(\)'s options to mpcompiler.backend"), torch.no_grad():
        torch.compile(MLP().eval(), backend=mpcompiler.backend(calib), options={"tolerance": 1e-3})(x)
    with pytest.raises(Exception, match=r"backend=mpcompiler.backend\(samples, ...\)"), torch.no_grad():
        torch.compile(MLP().eval(), backend=mpcompiler.backend)(x)  # the factory itself: dynamo called it


def test_a_graph_after_a_break_runs_as_captured_and_says_so():
    torch.manual_seed(0)
    model = Broken().eval()
    fast, backend = _compiled(model)
    x = torch.randn(8, 16)
    with pytest.warns(UserWarning, match="graph break in forward"), torch.no_grad():
        assert _rel(fast(x), model(x)) < TOL[torch.float16]
    assert len(backend.compiled) == 1  # the graph before the break


def test_a_sample_that_does_not_fit_the_arguments_is_named():
    model = MLP().eval()
    backend = mpcompiler.backend([{"y": torch.randn(8, 16)} for _ in range(10)])
    with pytest.raises(Exception, match="a calibration sample has keyword 'y'; the function takes self, x"):
        with torch.no_grad():
            torch.compile(model, backend=backend, dynamic=False)(torch.randn(8, 16))
    backend = mpcompiler.backend([(torch.randn(8, 16), torch.randn(8, 16)) for _ in range(10)])
    with pytest.raises(Exception, match="a calibration sample has 2 positional arguments"), torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(torch.randn(8, 16))


class Outer(nn.Module):
    """A graph break inside a submodule: dynamo compiles the submodule's forward as a graph of its own,
    whose input is an intermediate value (here 100x the model's input)."""

    def __init__(self):
        super().__init__()
        self.pre, self.block = nn.Linear(16, 16), Broken()

    def forward(self, x):
        return self.block(self.pre(x) * 100)


def test_a_callee_compiled_alone_after_a_break_is_not_calibrated_on_the_models_inputs():
    torch.manual_seed(0)
    model = Outer().eval()
    backend = mpcompiler.backend(iter([torch.randn(8, 16) for _ in range(10)]))  # read once
    fast = torch.compile(model, backend=backend, dynamic=False)
    x = torch.randn(8, 16)
    with pytest.warns(UserWarning, match="reads values from inside forward"), torch.no_grad():
        assert _rel(fast(x), model(x)) < TOL[torch.float16]
    assert len(backend.compiled) == 1  # the model's own graph, up to the call into the block


def test_sequential_module_paths_are_the_models():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    backend = mpcompiler.backend([torch.randn(8, 4, 4) for _ in range(10)], keep_fp32="3")
    fast = torch.compile(model, backend=backend, dynamic=False)
    x = torch.randn(8, 4, 4)
    with torch.no_grad():
        assert _rel(fast(x), model(x)) < TOL[torch.float16]
    dtypes = {n.module_path: n.dtype for n in backend.compiled[0].report.nodes if n.op == "linear"}
    assert dtypes == {"1": "float16", "3": "float32"}  # dynamo calls them L['fn'].1 and L['fn'].3


class Reshaping(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x.reshape(x.shape[0], -1))  # dynamo bakes the batch size into the graph


def test_a_recompilation_for_a_shape_the_samples_lack_runs_as_captured():
    torch.manual_seed(0)
    model = Reshaping().eval()
    backend = mpcompiler.backend([torch.randn(8, 4, 4) for _ in range(10)])
    fast = torch.compile(model, backend=backend, dynamic=False)
    eight, three = torch.randn(8, 4, 4), torch.randn(3, 4, 4)
    with torch.no_grad():
        assert _rel(fast(eight), model(eight)) < TOL[torch.float16]
        with pytest.warns(UserWarning, match="cannot be captured on the calibration samples"):
            assert _rel(fast(three), model(three)) < 1e-6  # fp32, as captured
    assert len(backend.compiled) == 1
