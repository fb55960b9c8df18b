"""ONNX artifact: valid, same precision plan, names, provenance, atomic, verified in ONNX Runtime (CPU)."""

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torchvision
import transformers
from onnx import TensorProto
from onnxruntime.transformers.float16 import convert_float_to_float16
from torch.export import Dim

import mpcompiler
import mpcompiler.emit_onnx
from mpcompiler import ort_child
from tests.helpers import TOL, Tiny, run_handoff_snippet

transformers.logging.set_verbosity_error()
DATA_MOVEMENT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Concat", "Expand", "Flatten"}


def _bert_sample(b, s):
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s // 2 :] = 0
    return {"input_ids": torch.randint(0, 1000, (b, s)), "attention_mask": mask}


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=512, vocab_size=1000
    )
    model = transformers.BertModel(cfg).eval()
    calib = [_bert_sample(b, s) for b, s in [(4, 16), (2, 24), (3, 20), (2, 8), (3, 32)]]
    return model, mpcompiler.compile(model, calib)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    return model, mpcompiler.compile(model, [torch.randn(2, 3, 64, 64) for _ in range(5)])


def _casts(model: onnx.ModelProto, floats=False):
    """Cast nodes (``floats``: those to a float type, the precision plan's; not an index's int32)."""
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    kinds = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    return [n for n in casts if onnx.helper.get_node_attr_value(n, "to") in kinds] if floats else casts


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def _fp32_export(model, args, kwargs, dynamic_shapes) -> onnx.ModelProto:
    return torch.onnx.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, dynamo=True).model_proto


def _check_plan(m: onnx.ModelProto, fp32: onnx.ModelProto):
    """The precision plan in ONNX terms; and no worse than ORT's float16 converter on casts."""
    producers = {o: n for n in m.graph.node for o in n.output}
    for cast in _casts(m):
        src = producers.get(cast.input[0])
        assert src is None or src.op_type != "Cast", f"cascaded casts {src.name} -> {cast.name}"
        # no fp32 island: a cast up feeding data movement feeding a cast down
        if src is not None and src.op_type in DATA_MOVEMENT:
            before = producers.get(src.input[0])
            assert before is None or before.op_type != "Cast", f"cast island around {src.op_type}"
    peer = convert_float_to_float16(fp32, keep_io_types=True)
    assert len(_casts(m, floats=True)) <= len(_casts(peer, floats=True))
    assert _weight_bytes(m) <= 0.52 * _weight_bytes(fp32)
    fp16_weights = [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert fp16_weights and all(
        t.data_type != TensorProto.FLOAT for t in m.graph.initializer if t.dims and len(t.dims) >= 2
    )


def _check_provenance(m: onnx.ModelProto, compute_ops: set[str]):
    for node in m.graph.node:
        if node.op_type in compute_ops:
            props = {p.key: p.value for p in node.metadata_props}
            assert props.get("mpcompiler.fx_node") and "mpcompiler.module_path" in props, node.name
            assert props["mpcompiler.dtype"] == "f16"
    summary = {p.key: p.value for p in m.metadata_props}
    assert summary["mpcompiler.dtype"] == "float16" and summary["mpcompiler.version"] == mpcompiler.__version__
    for key in ("mpcompiler.ops_per_dtype", "mpcompiler.tolerance", "mpcompiler.calibration_samples"):
        assert key in summary


def test_bert_onnx(bert, tmp_path):
    model, compiled = bert
    art = compiled.export_onnx(tmp_path / "bert.onnx")
    assert art.verified_with == "CPUExecutionProvider"
    assert max(art.error_vs_fp32.values()) <= TOL[torch.float16] and max(art.error_vs_fx.values()) <= TOL[torch.float16]
    m = onnx.load(tmp_path / "bert.onnx")
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in m.graph.output] == ["last_hidden_state", "pooler_output"]
    assert {i.type.tensor_type.elem_type for i in m.graph.input} == {TensorProto.INT64}
    assert {o.type.tensor_type.elem_type for o in m.graph.output} == {TensorProto.FLOAT}
    dims = [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["input_ids_dim0", "input_ids_dim1"]
    ds = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "attention_mask": {0: Dim.AUTO, 1: Dim.AUTO}}
    _check_plan(m, _fp32_export(model, (), _bert_sample(2, 16), ds))
    _check_provenance(m, {"MatMul", "Gemm"})

    # a new shape, straight through ONNX Runtime, against the fp32 model
    sample = _bert_sample(5, 40)
    sess = ort.InferenceSession(str(tmp_path / "bert.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {k: v.numpy() for k, v in sample.items()})[0]
    with torch.no_grad():
        ref = model(**sample).last_hidden_state.numpy()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < TOL[torch.float16]

    handoff = json.loads((tmp_path / "bert.onnx.json").read_text())
    assert handoff["dynamic_axes"]["attention_mask"] == {"0": "attention_mask_dim0", "1": "input_ids_dim1"}
    assert handoff["verified_with"]["onnxruntime"] == ort.__version__
    md = (tmp_path / "bert.onnx.md").read_text()
    assert "io_binding()" in md and 'bind_output("pooler_output", device)' in md and "held-out" in md
    # the handoff's snippet, pasted as it is (here: ONNX Runtime's CPU provider)
    namespace = run_handoff_snippet(tmp_path / "bert.onnx.md", {k: v.numpy() for k, v in sample.items()})
    assert namespace["device"] == ("cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu")
    np.testing.assert_allclose(namespace["last_hidden_state"], out, rtol=1e-3, atol=1e-3)


def test_resnet_onnx(resnet, tmp_path):
    model, compiled = resnet
    art = compiled.export_onnx(tmp_path / "resnet.onnx")
    assert max(art.error_vs_fp32.values()) <= TOL[torch.float16]
    m = onnx.load(tmp_path / "resnet.onnx")
    assert [o.name for o in m.graph.output] == ["output"]
    ops = Counter(n.op_type for n in m.graph.node)
    assert ops["Conv"] == 20 and ops["BatchNormalization"] == 0  # folded at compile time
    _check_plan(m, _fp32_export(model, (torch.randn(2, 3, 64, 64),), {}, ({0: Dim.AUTO},)))
    _check_provenance(m, {"Conv"})


def test_fp16_io(bert, tmp_path):
    _, compiled = bert
    art = compiled.export_onnx(tmp_path / "bert16.onnx", io_dtype="float16")
    m = onnx.load(tmp_path / "bert16.onnx")
    assert {o.type.tensor_type.elem_type for o in m.graph.output} == {TensorProto.FLOAT16}
    assert not _casts(m, floats=True)  # no float casts at the edges (the ids' int32 and the mask's bool remain)
    assert max(art.error_vs_fp32.values()) <= TOL[torch.float16]
    with pytest.raises(mpcompiler.ExportError, match="only 'float16' I/O"):
        compiled.export_onnx(tmp_path / "x.onnx", io_dtype="bfloat16")


def test_the_onnx_lowering_dumps_its_passes_in_the_onnx_folder(tmp_path):
    # export_onnx rewrites a copy of the compiled graph through the pass manager: with compile()'s dump_dir,
    # a dump per pass in <dump_dir>/onnx/ (every pass in debug runs), the last export's alone
    data = [torch.randn(4, 16) for _ in range(2)]
    compiled = mpcompiler.compile(Tiny().eval(), data, dump_dir=tmp_path / "dumps", debug=True)
    compiled.export_onnx(tmp_path / "t.onnx", io_dtype="float16", verify="off")
    folder = tmp_path / "dumps" / "onnx"
    names = ["00_capture.txt", "01_low_precision_io.txt", "02_eliminate_casts.txt", "03_lower_fused.txt"]
    assert sorted(p.name for p in folder.iterdir()) == names
    header = (folder / "01_low_precision_io.txt").read_text().splitlines()[0]
    assert header.startswith("// after 01 low_precision_io (changed; inputs_cast=1; outputs_cast=1; ")
    # the input's record says f16 too, so eliminate_casts folds its cast pair: fc1 reads the f16 input itself
    assert "%linear = linear(%x, %fc1_weight, %fc1_bias)" in (folder / "02_eliminate_casts.txt").read_text()
    compiled.export_onnx(tmp_path / "t.onnx", verify="off")  # no I/O rewrite: the first export's dumps go
    assert sorted(p.name for p in folder.iterdir()) == ["00_capture.txt", "01_lower_fused.txt"]
    mpcompiler.compile(Tiny().eval(), data, dump_dir=tmp_path / "dumps")  # a compile removes the export's
    assert list(folder.iterdir()) == []


def test_external_data_when_over_the_limit(resnet, tmp_path, monkeypatch):
    _, compiled = resnet
    monkeypatch.setattr(mpcompiler.emit_onnx, "EXTERNAL_DATA_LIMIT", 1024)
    art = compiled.export_onnx(tmp_path / "r.onnx")
    assert art.external_data == tmp_path / "r.onnx.data"
    assert (tmp_path / "r.onnx").stat().st_size < 200_000 < art.external_data.stat().st_size
    ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.onnx", "r.onnx.data", "r.onnx.json", "r.onnx.md"]


def test_failed_verification_leaves_nothing_behind(resnet, tmp_path, monkeypatch):
    _, compiled = resnet
    run = ort_child.run

    def wrong(*args, **kwargs):  # an ONNX Runtime that computes something else: each output doubled
        provider, outputs = run(*args, **kwargs)
        return provider, [[o * 2 for o in sample] for sample in outputs]

    monkeypatch.setattr(ort_child, "run", wrong)
    with pytest.raises(mpcompiler.ExportError, match="misses the tolerance 0.005"):
        compiled.export_onnx(tmp_path / "r.onnx")
    assert list(tmp_path.iterdir()) == []
    with pytest.warns(UserWarning, match="misses the tolerance"):
        compiled.export_onnx(tmp_path / "r.onnx", verify="warn")
    assert (tmp_path / "r.onnx").exists()


@torch.library.custom_op("mpctest::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mystic(nn.Module):
    def forward(self, x):
        return mystery(x)


class WithCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(8, 8), Mystic())

    def forward(self, x):
        return self.head(x)


def test_op_without_onnx_translation_is_named_with_its_module(tmp_path):
    compiled = mpcompiler.compile(WithCustomOp().eval(), [torch.randn(4, 8) for _ in range(2)])
    with pytest.raises(mpcompiler.ExportError, match=r"no translation for op mpctest\.mystery\.default at head\.1"):
        compiled.export_onnx(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_export_options(tmp_path):
    compiled = mpcompiler.compile(Tiny().eval(), [torch.randn(4, 16)])
    with pytest.raises(mpcompiler.ExportError, match="verify='maybe'"):
        compiled.export_onnx(tmp_path / "t.onnx", verify="maybe")
    with pytest.raises(mpcompiler.ExportError, match="is a folder: give the .onnx file's path in it"):
        compiled.export_onnx(tmp_path)  # IsADirectoryError from the final move before, after the whole export
    assert list(tmp_path.iterdir()) == []


def test_relative_path_is_verified(tmp_path, monkeypatch):
    """ONNX Runtime's child process runs in the artifact's folder; a relative path must still find it."""
    compiled = mpcompiler.compile(Tiny().eval(), [torch.randn(4, 16) for _ in range(2)])
    monkeypatch.chdir(tmp_path)
    art = compiled.export_onnx("out/t.onnx")
    assert art.verified_with == "CPUExecutionProvider" and max(art.error_vs_fp32.values()) < TOL[torch.float16]
    assert (tmp_path / "out" / "t.onnx").exists()


def test_bfloat16_artifact_is_written_but_not_verified_on_the_cpu(tmp_path):
    compiled = mpcompiler.compile(Tiny().eval(), [torch.randn(4, 16)], dtype="bfloat16")
    with pytest.warns(UserWarning, match="no bf16 kernels"):
        art = compiled.export_onnx(tmp_path / "t.onnx")
    assert art.verified_with is None and "Not verified" in art.handoff.read_text()
    m = onnx.load(tmp_path / "t.onnx")
    assert any(t.data_type == TensorProto.BFLOAT16 for t in m.graph.initializer)


@pytest.mark.gpu
def test_ort_float16_converter_overflows_where_mpcompiler_does_not(tmp_path):
    """On the GPU (ORT's CPU provider runs fp16 chains in fp32, casting only at their edges)."""
    from tests.helpers import Overflow

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (install onnxruntime-gpu)")

    model = Overflow().eval()
    compiled = mpcompiler.compile(model, [torch.randn(16, 16) for _ in range(6)])
    compiled.export_onnx(tmp_path / "o.onnx", providers=["CUDAExecutionProvider"])
    x = torch.randn(32, 16)
    peer = convert_float_to_float16(_fp32_export(model, (x,), {}, ({0: Dim.AUTO},)), keep_io_types=True)

    def run(onnx_model):
        return ort.InferenceSession(onnx_model, providers=["CUDAExecutionProvider"]).run(None, {"x": x.numpy()})[0]

    assert not np.isfinite(run(peer.SerializeToString())).all()  # no ranges: fc1's output overflows fp16
    ours = run(str(tmp_path / "o.onnx"))
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < TOL[torch.float16]


@pytest.mark.gpu
def test_bert_fused_ops_run_in_onnx_runtime_cuda_within_tolerance_for_either_padding(bert, tmp_path):
    """The ops ONNX Runtime's CUDA provider runs fused (issue #12), checked where they run: on CUDA."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
    model, compiled = bert
    art = compiled.export_onnx(tmp_path / "b.onnx", providers=["CUDAExecutionProvider"])
    assert art.verified_with == "CUDAExecutionProvider" and max(art.error_vs_fp32.values()) <= TOL[torch.float16]
    ops = {(n.domain, n.op_type) for n in onnx.load(tmp_path / "b.onnx").graph.node}
    fused = {("com.microsoft", op) for op in ("Attention", "SkipLayerNormalization", "BiasGelu")}
    fused |= {("com.microsoft", "EmbedLayerNormalization")}
    assert fused <= ops and ("", "Attention") not in ops
    sess = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CUDAExecutionProvider"])
    for left in (False, True):
        sample = _bert_sample(4, 32)
        if left:  # the padding at the front: the mask reaches the kernel whole
            sample["attention_mask"] = sample["attention_mask"].flip(-1)
        out = sess.run(["last_hidden_state"], {k: v.numpy() for k, v in sample.items()})[0]
        with torch.no_grad():
            ref = model(**sample).last_hidden_state.numpy()
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < TOL[torch.float16], f"left padding: {left}"
    # padding="right": Attention's 1-D mask index, with which the CUDA provider runs fused attention
    art = compiled.export_onnx(tmp_path / "r.onnx", providers=["CUDAExecutionProvider"], padding="right")
    assert art.verified_with == "CUDAExecutionProvider" and max(art.error_vs_fp32.values()) <= TOL[torch.float16]


def test_verification_carries_bf16_tensors_to_onnx_runtime_and_back(tmp_path):
    # numpy has no bf16: a bf16 input (a bf16 plan's KV cache) goes to ONNX Runtime's child process as its bits,
    # and a bf16 output comes back as the float32 of the same value (it died in numpy() on CUDA, run AH)
    x = onnx.helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 3])
    same, wide = (
        onnx.helper.make_tensor_value_info(n, t, [2, 3])
        for n, t in (("same", TensorProto.BFLOAT16), ("wide", TensorProto.FLOAT))
    )
    nodes = [onnx.helper.make_node("Identity", ["x"], ["same"]), onnx.helper.make_node("Cast", ["x"], ["wide"], to=1)]
    model = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "bf16", [x], [same, wide]), opset_imports=[onnx.helper.make_opsetid("", 17)]
    )
    onnx.save(model, tmp_path / "bf16.onnx")
    value = torch.tensor([[1.0, -2.5, 3e38], [0.0, 1e-3, -7.0]]).bfloat16()  # rounded to bf16 here
    provider, [[same, wide]] = ort_child.run(
        tmp_path / "bf16.onnx", [{"x": ort_child.feed_array(value)}], ["CPUExecutionProvider"]
    )
    assert provider == "CPUExecutionProvider" and same.dtype == wide.dtype == np.float32
    assert np.array_equal(same, value.float().numpy()) and np.array_equal(wide, value.float().numpy())
