"""export_triton: a Triton model repository whose config.pbtxt Triton's own ModelConfig protobuf parses,
matching the ONNX artifact beside it, written so that a failed export leaves the repository as it was."""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

import mpcompiler
from mpcompiler.triton_repo import model_config
from tests import cli_model


def _model_config_pb2():
    """Triton's ModelConfig message, from tritonclient (installed --no-deps: only this generated module
    is read, which needs protobuf alone; tritonclient.grpc's own __init__ would import grpc)."""
    spec = importlib.util.find_spec("tritonclient")
    assert spec is not None, "tritonclient is a test dependency: pip install --no-deps tritonclient"
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _parse(text: str):
    return text_format.Parse(text, _model_config_pb2().ModelConfig())


@pytest.fixture(scope="module")
def mlp():
    model = cli_model.build().eval()
    return model, mpcompiler.compile(model, cli_model.samples())


def test_repository_config_parses_and_matches_the_artifact(mlp, tmp_path):
    model, compiled = mlp
    folder = compiled.export_triton(tmp_path / "repo", "mlp", max_batch_size=16, instances=2)
    assert folder == tmp_path / "repo" / "mlp"
    config = _parse((folder / "config.pbtxt").read_text())
    graph = onnx.load(folder / "1" / "model.onnx", load_external_data=False).graph
    assert config.name == "mlp" and config.backend == "onnxruntime" and config.max_batch_size == 16
    assert config.HasField("dynamic_batching")  # every input and output has the batch as its first dim
    assert [i.name for i in config.input] == [i.name for i in graph.input]
    assert [o.name for o in config.output] == [o.name for o in graph.output]
    for entry, value in zip([*config.input, *config.output], [*graph.input, *graph.output], strict=True):
        dims = value.type.tensor_type.shape.dim[1:]  # Triton adds the batch dim
        assert list(entry.dims) == [-1 if d.dim_param else d.dim_value for d in dims]
        assert entry.data_type == _model_config_pb2().TYPE_FP32
    group = config.instance_group[0]
    assert group.count == 2 and group.kind == group.KIND_GPU
    # the handoff's CUDA graphs need one shape on every call: not under the dynamic batcher
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert all("enable_cuda_graph" not in a.parameters for a in accelerators)
    # what Triton would load runs as the compiled module does (ONNX Runtime on the CPU here)
    x = cli_model.samples()[0]
    sess = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {graph.input[0].name: x.numpy()})
    want = compiled(x).detach().numpy()
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_a_failed_export_leaves_the_model_as_it_was(mlp, tmp_path, monkeypatch):
    _, compiled = mlp
    repo = tmp_path / "repo"
    compiled.export_triton(repo, "mlp")
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    config = (repo / "mlp" / "config.pbtxt").read_text()

    def broken(*args, **kwargs):
        raise mpcompiler.ExportError("ONNX Runtime disagreed")

    monkeypatch.setattr(type(compiled), "export_onnx", broken)
    with pytest.raises(mpcompiler.ExportError, match="disagreed"):
        compiled.export_triton(repo, "mlp", max_batch_size=4)
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before  # no staging folder left
    assert (repo / "mlp").stat().st_mode & 0o755 == 0o755  # readable by a server running as another user
    assert (repo / "mlp" / "config.pbtxt").read_text() == config


def test_a_failed_swap_puts_the_earlier_model_back(mlp, tmp_path, monkeypatch):
    _, compiled = mlp
    repo = tmp_path / "repo"
    compiled.export_triton(repo, "mlp")
    config = (repo / "mlp" / "config.pbtxt").read_text()
    rename = Path.rename

    def failing(self, target):  # the new folder cannot move in (the old one already moved aside)
        if self.name.startswith(".mlp.") and ".old." not in self.name:
            raise OSError("disk full")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk full"):
        compiled.export_triton(repo, "mlp", max_batch_size=4)
    monkeypatch.undo()
    assert (repo / "mlp" / "config.pbtxt").read_text() == config
    assert [p.name for p in repo.iterdir()] == ["mlp"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"name": "my model"}, "Triton model name 'my model'"),
        ({"name": "../up"}, "Triton model name"),
        ({"name": "m", "instances": 0}, "instances must be a positive int"),
        ({"name": "m", "kind": "tpu"}, "kind='tpu'"),
    ],
)
def test_bad_options_are_one_clear_error(mlp, tmp_path, options, message):
    _, compiled = mlp
    with pytest.raises(mpcompiler.OptionError, match=message):
        compiled.export_triton(tmp_path, **options)
    assert not any(tmp_path.iterdir())


def test_generation_artifact_config_keeps_the_cache_dims_dynamic():
    # the handoff JSON of a generation artifact (as export_onnx writes it): batch first everywhere
    info = {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch_size", "total_sequence_length"]},
            {
                "name": "past_key_values.0.key",
                "dtype": "float16",
                "shape": ["batch_size", 2, "past_sequence_length", 16],
            },
        ],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch_size", "sequence_length", 1000]},
            {"name": "present.0.key", "dtype": "float16", "shape": ["batch_size", 2, "total_sequence_length", 16]},
        ],
        "cuda_provider_options": {},
    }
    config = _parse(model_config(info, "llm", 4, 1, "gpu"))
    assert config.max_batch_size == 4 and list(config.input[2].dims) == [2, -1, 16]
    assert config.input[2].data_type == _model_config_pb2().TYPE_FP16 and list(config.output[0].dims) == [-1, 1000]
    assert not config.HasField("optimization")
    # no shared batch dim (a static or a differently named first dim): max_batch_size 0, whole dims
    info["outputs"][0]["shape"] = [1, "sequence_length", 1000]
    config = _parse(model_config(info, "llm", 4, 1, "cpu"))
    assert config.max_batch_size == 0 and list(config.output[0].dims) == [1, -1, 1000]
    assert (
        not config.HasField("dynamic_batching") and config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    )


def test_cuda_graphs_stay_out_and_a_scalar_gets_a_dim():
    # ONNX Runtime's CUDA graph replays the buffers it captured; Triton binds each request's own
    info = {
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3, 8, 8]}],
        "outputs": [
            {"name": "y", "dtype": "float32", "shape": [1, 10]},
            {"name": "s", "dtype": "float32", "shape": []},
        ],
        "cuda_provider_options": {"enable_cuda_graph": "1", "prefer_nhwc": "1"},
    }
    config = _parse(model_config(info, "cnn", 8, 1, "gpu"))
    (cuda,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert cuda.name == "cuda" and dict(cuda.parameters) == {"prefer_nhwc": "1"}
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 3, 8, 8]
    # Triton refuses an empty dims: a 0-d output (or a batched one of shape [batch]) is [1] reshaped to []
    assert list(config.output[1].dims) == [1] and config.output[1].reshape.shape == []
    assert config.output[1].HasField("reshape")
    with pytest.raises(mpcompiler.OptionError, match="complex64"):
        model_config(info | {"outputs": [{"name": "y", "dtype": "complex64", "shape": [1]}]}, "cnn", 8, 1, "gpu")


def test_an_exported_artifact_is_copied_under_its_own_name(mlp, tmp_path):
    _, compiled = mlp
    artifact = compiled.export_onnx(tmp_path / "net.onnx")
    folder = compiled.export_triton(tmp_path / "repo", "net", artifact=artifact)
    config = _parse((folder / "config.pbtxt").read_text())
    assert config.default_model_filename == "net.onnx"
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["net.onnx", "net.onnx.json", "net.onnx.md"]
    assert (folder / "1" / "net.onnx").read_bytes() == artifact.path.read_bytes()
    with pytest.raises(mpcompiler.OptionError, match="io_dtype would not apply"):
        compiled.export_triton(tmp_path / "repo", "net", artifact=artifact, io_dtype="float16")
