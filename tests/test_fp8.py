"""compile(dtype="fp8"): e4m3 GEMMs where the plan and the tolerance allow, checked against fp32 numbers.

On the CPU the GEMMs run torch's reference ``_scaled_mm``, which rounds as cuBLASLt's fp8 kernel does
(docs/precision.md: the two agree to 2.4e-4); the GPU tests run the same models there.
"""

import copy
import json

import pytest
import torch
import torch.nn as nn

import mpcompiler
from mpcompiler import fp8
from mpcompiler.llm import positions
from tests.helpers import TOL, rel_err


class Mlp(nn.Module):
    """Four linears of dims that suit _scaled_mm, one of a dim that does not (24), and a product of two
    activations (no weight)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 64), nn.Linear(64, 24)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.tanh(self.b(h))
        h = self.c(h) + h
        return self.d(h @ h.transpose(-1, -2) @ h / 64)


def _data(seed=0, n=8):
    torch.manual_seed(seed)
    return [torch.randn(2, 16, 64) for _ in range(n)]


def _e4m3_linear(lin, h, x_absmax, w_absmax=None):
    """What an fp8 linear computes, written out: e4m3 input and weight with absmax scales, fp16 out."""
    w = lin.weight.detach()  # its scale from the parameter; its e4m3 values from its fp16 copy
    xs, ws = fp8.scale(x_absmax), fp8.scale(w_absmax or float(w.abs().max()))
    x8 = (h.half().float() * (1 / xs)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * xs
    w8 = (w.half().float() * (1 / ws)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * ws
    return (x8 @ w8.t() + lin.bias.detach().half().float()).half()


def test_fp8_linears_compute_e4m3_products_and_store_weights_once():
    torch.manual_seed(0)
    model, calib = Mlp().eval(), _data()
    compiled = mpcompiler.compile(model, calib, dtype="fp8", held_out=2)
    report = compiled.report
    gemms = {d.module_path: d for d in report.ops() if d.fp8_reason}
    assert {p for p, d in gemms.items() if d.fp8} == {"a", "b", "c"}
    assert "multiples of 16" in gemms["d"].fp8_reason and gemms["d"].op == "linear"
    # weights stored once, in e4m3: no fp16 or fp32 copy of a, b, c's weights is left
    params = dict(compiled.graph_module.named_parameters()) | dict(compiled.graph_module.named_buffers())
    for name in "abc":
        assert params[f"{name}.weight_e4m3"].dtype == torch.float8_e4m3fn and f"{name}.weight" not in params
    assert params["d.weight"].dtype == torch.float16
    # the first GEMM against its e4m3 product written out by hand (a's input absmax from calibration)
    x = _data(seed=1, n=1)[0]
    absmax = max(float(c.abs().max()) for c in calib[:-2])
    assert gemms["a"].fp8["x_scale"] == pytest.approx(fp8.scale(absmax))
    with torch.no_grad():
        hand = _e4m3_linear(model.a, x, absmax)
    gemm = next(n for n in compiled.graph_module.graph.nodes if n.target is fp8.SCALED_MM)
    assert gemm.args[7] is fp8.FAST_ACCUM  # use_fast_accum: how the GPU accumulates (the CPU's kernel: exactly)
    with torch.no_grad():
        out = _run_until(compiled.graph_module, gemm, x)
    assert rel_err(out.reshape(hand.shape).float(), hand.float()) < 1e-3
    # the whole model: e4m3's rounding (3 mantissa bits) costs percents where fp16 costs 1e-4
    with torch.no_grad():
        ref = model(x)
        err8 = rel_err(compiled(x), ref)
        err16 = rel_err(mpcompiler.compile(model, calib, held_out=2)(x), ref)
    assert err16 < TOL[torch.float16] and 5e-3 < err8 < 0.1, (err16, err8)


def test_the_report_says_how_often_held_out_inputs_saturate():
    # x_scale is the calibrated absmax / 448: on held-out samples 3x as large, as many values saturate as pass
    # that absmax (counted here by hand for the first linear)
    torch.manual_seed(0)
    model, calib = Mlp().eval(), _data()
    val = [x * 3 for x in _data(seed=5, n=2)]
    compiled = mpcompiler.compile(model, calib, dtype="fp8", val_data=val)
    gemms = {d.module_path: d for d in compiled.report.ops() if d.fp8_reason}
    x_scale = gemms["a"].fp8["x_scale"]
    past = sum(int(((v.half().float() * (1 / x_scale)).abs() > 448).sum()) for v in val)
    assert gemms["a"].fp8_saturated == past / sum(v.numel() for v in val) > 0.05
    assert all(gemms[p].fp8_saturated is not None for p in "bc") and gemms["d"].fp8_saturated is None
    worst = max(gemms.values(), key=lambda d: d.fp8_saturated or 0)
    assert f"past the calibrated absmax: at most {worst.fp8_saturated:.3%} ({worst.module_path})" in str(
        compiled.report
    )
    # on calibration samples: none of the model's input; downstream, the few values the plan's own rounding
    # upstream moves past what fp32 reached
    same = mpcompiler.compile(model, calib, dtype="fp8", val_data=calib[:2])
    again = {d.module_path: d.fp8_saturated for d in same.report.ops() if d.fp8_reason}
    assert again["a"] == 0 and 0 <= again["b"] < 1e-3 and 0 <= again["c"] < 1e-3


class TwoHeads(nn.Module):
    """Two linears of one input, their weights 8x apart in magnitude (a layer's k and v)."""

    def __init__(self):
        super().__init__()
        self.k, self.v = nn.Linear(64, 32), nn.Linear(64, 64)
        self.v.weight.data *= 8

    def forward(self, x):
        return self.k(x).repeat(1, 1, 2) * self.v(x)


def test_fp8_linears_of_one_input_are_one_gemm_with_one_weight_scale():
    torch.manual_seed(0)
    model, calib = TwoHeads().eval(), _data()
    compiled = mpcompiler.compile(model, calib, dtype="fp8", held_out=2)
    gemms = {d.module_path: d for d in compiled.report.ops() if d.fp8_reason}
    w_absmax = float(model.v.weight.detach().abs().max())  # the larger: k's weights round on v's scale
    assert gemms["k"].fp8["w_scale"] == gemms["v"].fp8["w_scale"] == pytest.approx(fp8.scale(w_absmax))
    assert "one GEMM with v" in gemms["k"].fp8_reason and "one GEMM with k" in gemms["v"].fp8_reason
    assert "fp8 (e4m3) GEMMs: 2 of 2 linears" in str(compiled.report)
    gm = compiled.graph_module
    (gemm,) = [n for n in gm.graph.nodes if n.target is fp8.SCALED_MM]  # one quantization of x, one GEMM
    stored = dict(gm.named_parameters()) | dict(gm.named_buffers())
    assert [t.dtype for t in stored.values()].count(torch.float8_e4m3fn) == 1  # the stacked weights, once
    assert not any(name.endswith("weight") for name in stored)  # and no fp16 or fp32 copy of them
    x = _data(seed=1, n=1)[0]
    absmax = max(float(c.abs().max()) for c in calib[:-2])
    with torch.no_grad():
        hand = torch.cat([_e4m3_linear(lin, x, absmax, w_absmax) for lin in (model.k, model.v)], -1)
        out = _run_until(gm, gemm, x)
        assert rel_err(out.reshape(hand.shape).float(), hand.float()) < 1e-3
        assert 5e-3 < rel_err(compiled(x), model(x)) < 0.1


def _run_until(gm, stop, *args):
    """The value of node ``stop`` when ``gm`` runs on ``args``."""
    seen = {}

    class Until(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is stop:
                seen["out"] = out
            return out

    Until(gm).run(*args)
    return seen["out"]


def _fp8_paths(report) -> set[str]:
    return {d.module_path for d in report.ops() if d.fp8}


def test_search_keeps_gemms_out_of_fp8_by_sensitivity_monotonically():
    torch.manual_seed(0)
    model, calib = Mlp().eval(), _data(n=10)
    val = _data(seed=2, n=4)
    kept, errors = [], []
    for tolerance in (0.1, 2e-2, 3e-3):
        compiled = mpcompiler.compile(model, calib, dtype="fp8", val_data=val, tolerance=tolerance)
        search = compiled.report.search
        assert search["fp8_candidates"] == 3
        kept.append(_fp8_paths(compiled.report))
        # the fp8 stage met it: the fp16 -> fp32 stage did not run, and the summary says only the first
        line = next(x for x in compiled.report.summary() if x.startswith("  tolerance search:"))
        assert f"{search['fp8_kept']} of 3 fp8 linears kept in float16" in line and "kept high" not in line
        # the error on the samples the search judged the plan on: within the tolerance
        judged = dict(search["fp8_evaluations"]).get(search["fp8_kept"])
        judged = judged if judged is not None else dict(search["evaluations"])[search["kept_high"]]
        errors.append(judged)
        assert judged <= tolerance, (tolerance, search)
    assert kept[0] >= kept[1] >= kept[2], kept  # a tighter tolerance never puts more GEMMs in fp8
    assert kept[0] == {"a", "b", "c"} and kept[2] == set(), kept  # 0.1 holds e4m3's ~4%, 3e-3 none of it
    promoted = [d for d in compiled.report.ops() if d.fp8_reason and "tolerance search" in d.fp8_reason]
    assert len(promoted) == 3 and all("alone in fp8 it would cost" in d.fp8_reason for d in promoted)


class SensitiveHead(nn.Module):
    """Two linears of one input (a layer's k and v), then a third: v's output is read 20x louder than k's, so v
    costs the most in e4m3 and k little."""

    def __init__(self):
        super().__init__()
        self.k, self.v, self.o = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.o(torch.tanh(self.k(x) + 20 * self.v(x)))


def test_search_keeps_linears_of_one_input_out_of_fp8_together():
    # e4m3 and fp16 halves of one input's linears would run as two GEMMs where the plan ran one: when the
    # search takes v out of fp8, k comes with it (k alone is cheap in e4m3), so their GEMM stays one
    torch.manual_seed(0)
    model, calib = SensitiveHead().eval(), _data(n=10)
    val = _data(seed=2, n=4)
    compiled = mpcompiler.compile(model, calib, dtype="fp8", val_data=val, tolerance=3e-2)
    gemms = {d.module_path: d for d in compiled.report.ops() if d.fp8_reason}
    assert gemms["v"].sensitivity > 3 * gemms["k"].sensitivity  # k would stay on its own cost
    assert _fp8_paths(compiled.report) == {"o"}, compiled.report
    assert "alone in fp8 it would cost" in gemms["v"].fp8_reason
    assert "kept out of fp8 with" in gemms["k"].fp8_reason and "one GEMM on one input" in gemms["k"].fp8_reason
    assert "1 of 3 fp8 linears kept in float16 and 1 more with a linear of their input" in str(compiled.report)
    with torch.no_grad():
        assert rel_err(compiled(val[0]), model(val[0])) <= 3e-2 * 1.5  # the search judged the plan on val[:2]


class Outlier(nn.Module):
    """a -> relu -> b -> tanh -> c, where b's input has one channel ``ratio`` times the others and b's weights
    of it 1/ratio times theirs (an LLM's massive activation: the channel is large, the output ordinary)."""

    def __init__(self, ratio: float):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 32)
        self.register_buffer("gain", torch.full((128,), 0.01))
        self.gain[7] *= ratio
        with torch.no_grad():
            self.b.weight.mul_(100)
            self.b.weight[:, 7] /= ratio

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.relu(self.a(x)) * self.gain)))


@pytest.mark.parametrize("ratio", [1.0, 3e4])
def test_a_gemm_whose_input_has_an_outlier_stays_fp16(ratio):
    torch.manual_seed(0)
    model, calib = Outlier(ratio).eval(), _data(n=10)
    val = _data(seed=2, n=4)
    compiled = mpcompiler.compile(model, calib, dtype="fp8", val_data=val, tolerance=0.05)
    gemms = {d.module_path: d for d in compiled.report.ops() if d.fp8_reason}
    # e4m3's per-tensor scale spends its range on the channel 3e4 times the others, which it then rounds
    # to a few subnormal steps: b's own error goes from e4m3's usual ~4% to ~11%, and the search keeps b
    # (alone) in fp16; without the outlier it keeps another
    assert (gemms["b"].local_error > 0.08) == (ratio > 1), gemms["b"]
    assert (_fp8_paths(compiled.report) == {"a", "c"}) == (ratio > 1), compiled.report
    assert ("tolerance search" in gemms["b"].fp8_reason) == (ratio > 1)
    with torch.no_grad():
        assert rel_err(compiled(val[0]), model(val[0])) <= 0.05 * 1.5  # the search judged the plan on val[:2]


def test_report_and_dump_say_why_each_linear_got_its_level(tmp_path):
    torch.manual_seed(0)
    model, calib = Mlp().eval(), _data()
    compiled = mpcompiler.compile(model, calib, dtype="fp8", held_out=2, dump_dir=tmp_path)
    text = str(compiled.report)
    assert "fp8 (e4m3) GEMMs: 3 of 4 linears" in text
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["fp8"] is True and data["dtype"] == "float16"
    gemm = next(n for n in data["nodes"] if n["module_path"] == "a" and n["fp8"])
    assert gemm["op"] == "_scaled_mm" and set(gemm["fp8"]) == {"x_scale", "w_scale"}
    assert gemm["fp8_reason"].startswith("fp8: x / ")
    loaded = mpcompiler.Report.load(tmp_path / "report.json")
    assert loaded.fp8 and _fp8_paths(loaded) == {"a", "b", "c"}
    dump = (tmp_path / "06_assign_fp8.txt").read_text()
    assert "# not fp8: its weight is 24 x 64" in dump and dump.count("# fp8: x / ") == 3


def test_fp8_errors_name_the_cause(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert "A100 (compute capability 8.0) has no fp8 tensor cores" in fp8.supported(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.supported(torch.device("cuda")) is None and fp8.supported(torch.device("cpu")) is None


def test_an_fp8_plan_exports_e4m3_weights_to_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    compiled = mpcompiler.compile(Mlp().eval(), _data(), dtype="fp8", held_out=2)
    # verified in ONNX Runtime (CPU here): within 5e-3 of the FX module, and of fp32 beyond the FX module's error
    artifact = compiled.export_onnx(tmp_path / "fp8.onnx")
    assert max(artifact.error_vs_fx.values()) < 5e-3 and max(artifact.error_vs_fp32.values()) > 5e-3
    model = onnx.load(tmp_path / "fp8.onnx")
    e4m3 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(e4m3) == 3 and sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == 6


def _e4m3_weights_model(model, compiled):
    """``model`` in fp32 with each fp8 linear's weight its e4m3 values times its scale (the report's: its fp16
    weight quantized as lower_fp8 does): what a decode graph of e4m3 weights and fp16 inputs computes, but
    for fp16's rounding."""
    scales = {n.module_path: n.fp8["w_scale"] for n in compiled.report.nodes if n.fp8 and n.fp8_reason}
    dequantized = copy.deepcopy(model)
    for name, module in dequantized.named_modules():
        if name in scales:
            module.weight.data = fp8.quantize(module.weight.data.half(), scales[name]).float() * scales[name]
    assert len(scales) and set(scales) <= dict(dequantized.named_modules()).keys()
    return dequantized


def _token_by_token(step, seq, max_seq=64):
    """``step``'s logits for each token of ``seq`` fed one at a time (an empty cache first), [B, T, vocab]."""
    ids, mask = seq["input_ids"], seq["attention_mask"]
    slots, got = torch.zeros(ids.shape[0], max_seq, dtype=torch.long, device=ids.device), []
    for t in range(ids.shape[1]):
        slots[:, t] = mask[:, t]
        got.append(step(ids[:, t : t + 1], slots, positions(mask)[:, t : t + 1], torch.tensor([t], device=ids.device)))
    return torch.stack(got, 1)


def _lm_logits(model, seq):
    with torch.no_grad():
        return model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"],
                     position_ids=positions(seq["attention_mask"])).logits  # fmt: skip


def test_fp8_generation_decodes_one_row_with_e4m3_weights():
    # compile(max_seq=..., dtype="fp8"): the prompt step's linears are e4m3 GEMMs (judged by perplexity on the
    # held-out text); the 1-row decode graph reads the same e4m3 weights dequantized, with fp16 inputs
    from tests.test_llm import _llama, _padded, _prompt

    model = _llama()
    prompts = [_prompt(2, 6, 2), _prompt(2, 9), _prompt(1, 7), _prompt(3, 5, 1), _prompt(2, 8, 3)]
    compiled = mpcompiler.compile(model, prompts, max_seq=64, max_batch=2, dtype="fp8", tolerance=0.05)
    assert compiled.report.accuracy.metric == "perplexity" and compiled.report.accuracy.met
    assert "fp8 (e4m3) GEMMs: 14 of 15 linears" in str(compiled.report)  # the LM head's 1000 rows: not 16's
    one, _ = compiled.generator.decode_step(1)
    two, _ = compiled.generator.decode_step(2)
    # more rows: cuBLASLt's e4m3 GEMMs, 4 a layer (q, k and v joined, and gate and up: one scale each)
    assert sum(n.target is fp8.SCALED_MM for n in two.graph.nodes) == 8
    assert not any(n.target is fp8.SCALED_MM for n in one.graph.nodes)
    weights = [n.args[1] for n in one.graph.nodes if n.target is torch.ops.aten.linear.default]
    e4m3 = [w for w in weights if w.op != "get_attr"]  # e4m3 x scale, in fp16: no fp16 copy of them is stored
    assert len(e4m3) == 8 and len(weights) == 9
    seq = {k: v[1:] for k, v in _prompt(2, 9, pad=2).items()}  # every token through the 1-row graph
    got = _token_by_token(_padded(one, 1), seq)
    want, ref = _lm_logits(_e4m3_weights_model(model, compiled), seq), _lm_logits(model, seq)
    assert rel_err(got, want) < 2e-3  # fp16's rounding only
    assert 1e-2 < rel_err(got, ref) < 0.1  # e4m3's, against fp32's weights


def test_an_fp8_language_model_artifact_is_held_to_the_fx_modules_own_error(tmp_path, monkeypatch):
    # e4m3's rounding steps turn fp16 rounding differences into percents: the artifact must be as accurate
    # as the FX module against fp32 and choose its greedy tokens, not equal its numbers to 5e-3
    pytest.importorskip("onnxruntime")
    from tests.test_llm import _llama, _prompt

    prompts = [_prompt(2, 6, 2), _prompt(2, 9), _prompt(1, 7), _prompt(3, 5, 1), _prompt(2, 8, 3)]
    compiled = mpcompiler.compile(_llama(), prompts, max_seq=64, max_batch=2, dtype="fp8")
    nudged = copy.deepcopy(compiled.graph_module)  # each weight scale as fp16 rounds it (2^-11): 1e-2 apart
    for scale in (b for name, b in nudged.named_buffers() if name.endswith("e4m3_scale")):
        scale.mul_(1 + 2**-11)
    args, kwargs = compiled.val_samples[0]
    with torch.no_grad():
        assert rel_err(nudged(*args, **kwargs).logits, compiled.graph_module(*args, **kwargs).logits) > 5e-3
    artifact = compiled.export_onnx(tmp_path / "llm8.onnx")  # verify="error": it passed
    # further from the FX module than the former check's 5e-3, nearer than either is to fp32
    assert 5e-3 < artifact.error_vs_fx["logits"] < artifact.error_vs_fp32["logits"]
    assert artifact.error_vs_fx["greedy_agreement"] >= 0.85
    # an artifact whose GEMMs forget the weights' scales fails, named by its own path (not its temporary one)
    right = fp8.scaled_mm_onnx

    def unscaled(self, mat2, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        return right(self, mat2, scale_a, scale_a, bias)

    monkeypatch.setattr(fp8, "scaled_mm_onnx", unscaled)
    with pytest.raises(mpcompiler.ExportError, match=f"the ONNX artifact {tmp_path / 'bad.onnx'} misses"):
        compiled.export_onnx(tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.gpu
def test_fp8_gemms_on_the_gpu_compute_what_the_cpu_reference_does():
    model, calib = Mlp().eval(), _data()
    x = _data(seed=1, n=1)[0]
    cpu = mpcompiler.compile(model, calib, dtype="fp8", held_out=2)
    gpu = mpcompiler.compile(model, calib, dtype="fp8", held_out=2, device="cuda")
    with torch.no_grad():
        ref, want = model(x), cpu(x)
        # cuBLASLt's fp8 GEMM against torch's CPU reference kernel (calibrated apart: scales equal to rounding)
        assert rel_err(gpu(x.cuda()).cpu(), want) < 5e-3
        fast = gpu.cuda_graph(x)  # Inductor: the inputs' quantization fused into their producers' kernels
        assert rel_err(fast(x.cuda()).cpu(), want) < 5e-3
        assert 5e-3 < rel_err(fast(x.cuda()).cpu(), ref) < 0.1


def test_an_unpadded_prompts_e4m3_lm_head_reads_its_last_position_alone():
    # lower_prompt_step's last_logits through lower_fp8's quantization and reshapes: the LM head (1,024 rows, an
    # e4m3 GEMM here) runs one row a prompt; the logits are the whole-sequence module's at the last position
    import transformers

    from mpcompiler.llm import Generator
    from tests.test_llm import _prompt

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    prompts = [{k: v.clamp(max=1023) for k, v in _prompt(2, n, 1).items()} for n in (6, 9, 7, 5, 8)]
    compiled = mpcompiler.compile(model, prompts, max_seq=64, max_batch=2, dtype="fp8")
    assert "fp8 (e4m3) GEMMs: 15 of 15 linears" in str(compiled.report)
    generator = Generator(compiled.graph_module, compiled.lm)
    ids = torch.randint(3, 1024, (2, 9))
    slots = torch.zeros(2, 64, dtype=torch.long)
    slots[:, :9] = 1
    t = torch.arange(9)
    got = generator(ids, slots, t[None].expand(2, -1), t, causal=True)
    head = [n for n in generator._prefill[True][1].graph.nodes if n.target is fp8.SCALED_MM][-1]
    assert tuple(head.meta["val"].shape) == (2, 1024)  # one row a prompt, not 2 x 9
    ones = torch.ones_like(ids)
    want = compiled(input_ids=ids, attention_mask=ones, position_ids=positions(ones), use_cache=False).logits[:, -1]
    assert rel_err(got, want) < 1e-3


@pytest.mark.gpu
def test_fp8_generation_on_the_gpu_decodes_with_e4m3_weights():
    # the decode CUDA graphs on the GPU: 1 row Inductor's reductions over e4m3 weights, 2 rows cuBLASLt's GEMMs
    from tests.test_llm import _llama, _prompt

    model = _llama("cuda")
    prompts = [{k: v.cuda() for k, v in _prompt(2, n, 1).items()} for n in (6, 9, 7, 5, 8)]
    compiled = mpcompiler.compile(model, prompts, max_seq=64, max_batch=2, dtype="fp8")
    seq = {k: v[1:].cuda() for k, v in _prompt(2, 9, pad=2).items()}
    with torch.no_grad():
        got = _token_by_token(compiled.generator, seq)  # each step a replay of the 1-row CUDA graph
    assert compiled.generator._decode_steps[1, False][1] is not None
    want, ref = _lm_logits(_e4m3_weights_model(model, compiled), seq), _lm_logits(model, seq)
    assert rel_err(got, want) < 2e-3 and 1e-2 < rel_err(got, ref) < 0.1
    pair = {k: v.cuda() for k, v in _prompt(2, 7, pad=3).items()}
    out = compiled.generate(**pair, max_new_tokens=8)  # the prompt step's e4m3 GEMMs, then the 2-row graph
    assert compiled.generator._decode_steps[2, True][1] is not None and out.shape == (2, 15)  # the greedy graph
