"""lower_fused: each fusion fires on real model graphs, not where the pattern differs, keeps the
numbers, and emits only what the target table says the target runs."""

import inspect
import math
import re
from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import transformers

import mpcompiler
from mpcompiler import fused
from mpcompiler.emit_fx import twin
from mpcompiler.fused import FUSED_OPS, has_kernel
from mpcompiler.ir import planned_dtype, record
from mpcompiler.passes import LowerFused
from mpcompiler.passes.lower_fused import RULES
from tests.helpers import TOL, nodes_by_op, rel_err, run_pipeline, stages, why_not

transformers.logging.set_verbosity_error()


# -- the fused-op table (mpcompiler.fused.FUSED_OPS): one row per op, and what each row must say


def test_each_rule_writes_one_fused_op_of_the_table():
    # has_kernel looks the rule's name up; a row no rule writes would be dead
    assert sorted(rule.name for rule in RULES) == sorted(FUSED_OPS)


def test_each_fused_op_row_has_kernels_a_translation_and_the_schemas_it_writes():
    custom = {v._opoverload for v in vars(fused).values() if isinstance(v, torch._library.custom_ops.CustomOpDef)}
    assert custom <= {row.op for row in FUSED_OPS.values()}  # a custom op with no row is never emitted
    for name, row in FUSED_OPS.items():
        assert row.kernels and all(
            target in fused.TARGETS and dtypes and dtypes <= fused.ALL for target, dtypes in row.kernels.items()
        ), name
        if row.op in custom and {"ort-cuda", "ort-cpu"} & row.kernels.keys():
            assert row.onnx is not None, f"{name} is emitted for ONNX Runtime but torch.onnx cannot write it"
        if row.onnx is None:
            assert not row.schemas, name
            continue
        # the contrib ops its translation writes are the schemas the row registers
        source = inspect.getsource(row.onnx)
        written = set(re.findall(r"_MSFT\.(\w+)", source))
        listed = {schema.name for schema in row.schemas}
        assert written <= listed <= written | set(re.findall(r"_OP\.(\w+)", source)), name
        assert all(onnx.defs.has(schema.name, schema.domain) for schema in row.schemas), name


def test_the_kernel_table_opset_23_ops_and_translations_are_read_from_the_rows():
    assert fused.KERNELS == {name: row.kernels for name, row in FUSED_OPS.items()}
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    assert fused.OPSET_23_OPS == {
        sdpa,
        torch.ops.mpcompiler.group_query_attention.default,
        torch.ops.mpcompiler.rotary_group_query_attention.default,
        torch.ops.mpcompiler.rms_norm.default,
        torch.ops.mpcompiler.qkv_attention.default,  # standard ops beside the contrib one (its mask's Cast)
        torch.ops.mpcompiler.embed_layer_norm.default,
    }
    # the custom ops' translations at every opset (torch.onnx has none of its own); SDPA's from opset 23 only
    custom = {row.op for row in FUSED_OPS.values() if row.onnx is not None and row.op is not sdpa}
    assert set(fused.onnx_translations(20)) == custom and set(fused.onnx_translations(23)) == custom | {sdpa}
    assert not has_kernel("bias_gelu", "ort-cpu", torch.float16) and has_kernel("gelu", "fx-cpu", None)
    with pytest.raises(ValueError, match="unknown target"):
        has_kernel("gelu", "trt", None)


def _bert(impl="sdpa", layers=2):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=layers, hidden_size=128, num_attention_heads=4, intermediate_size=512, vocab_size=1000,
        attn_implementation=impl,
    )  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _gpt2(impl="sdpa"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=128, use_cache=False, attn_implementation=impl
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert_sample(b, s):
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s // 2 :] = 0
    return {"input_ids": torch.randint(0, 1000, (b, s)), "attention_mask": mask}


def _fused_vs_unfused(model, sample):
    """Outputs of the captured fp32 graph before and after lower_fused, and the fused graph."""
    before = stages(model, [sample], upto="fold_batch_norm")
    after = stages(model, [sample], upto="lower_fused")
    out_b, out_a = before(**sample), after(**sample)
    first = lambda o: o[0] if isinstance(o, tuple) else next(iter(o.values()))  # noqa: E731
    return first(out_a), first(out_b), after


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_eager_attention_becomes_sdpa(make):
    sample = _bert_sample(2, 12) if make is _bert else {"input_ids": torch.randint(0, 1000, (2, 12))}
    got, ref, gm = _fused_vs_unfused(make("eager"), sample)
    assert len(nodes_by_op(gm, "scaled_dot_product_attention")) == 2
    assert not nodes_by_op(gm, "softmax") and not nodes_by_op(gm, "matmul")
    assert record(nodes_by_op(gm, "scaled_dot_product_attention")[0]).fused.startswith("eager attention")
    assert rel_err(got, ref) < 1e-5


class AttentionVariants(nn.Module):
    """Attention-like chains that must not fuse: softmax over another dim; scores read twice."""

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.125
        other_dim = torch.matmul(torch.softmax(s, dim=2), v)
        s2 = torch.matmul(q, k.transpose(-1, -2)) * 0.125
        p = torch.softmax(s2, dim=-1)
        read_twice = torch.matmul(p, v) + p.sum()
        return other_dim, read_twice


def test_attention_variants_do_not_fuse_and_say_why():
    x = [torch.randn(2, 4, 8, 16) for _ in range(3)]
    gm, results = run_pipeline(AttentionVariants(), [tuple(x)], upto="lower_fused")
    assert not nodes_by_op(gm, "scaled_dot_product_attention")
    assert len(nodes_by_op(gm, "softmax")) == 2
    # the rank-4 matmuls: two of scores (q first), one of a softmax over dim 2, one of a softmax read twice
    assert why_not(results["lower_fused"], "attention", besides="not a rank-4 matmul") == {
        "first operand is not a softmax read only here": 3,
        "softmax over dim 2, not the last": 1,
    }


def test_gpt2_tanh_gelu_formula_becomes_one_gelu_and_runs_fp16():
    sample = {"input_ids": torch.randint(0, 1000, (2, 12))}
    got, ref, gm = _fused_vs_unfused(_gpt2(), sample)
    gelus = nodes_by_op(gm, "gelu")
    assert len(gelus) == 2 and gelus[0].kwargs["approximate"] == "tanh"
    assert not nodes_by_op(gm, "pow") and not nodes_by_op(gm, "tanh")
    assert rel_err(got, ref) < 1e-5
    compiled = mpcompiler.compile(_gpt2(), [{"input_ids": torch.randint(0, 1000, (2, s))} for s in (8, 12, 16)])
    assert compiled.report.counts() == {"float16": compiled.report.counts()["float16"]}  # no fp32 island left


class GeluFormulas(nn.Module):
    def forward(self, x):
        erf_form = x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
        wrong_const = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.05 * torch.pow(x, 3.0))))
        return erf_form, wrong_const


def test_erf_formula_fuses_and_a_different_constant_does_not():
    gm, results = run_pipeline(GeluFormulas(), [torch.randn(4, 8)], upto="lower_fused")
    (gelu,) = nodes_by_op(gm, "gelu")
    assert gelu.kwargs["approximate"] == "none" and len(nodes_by_op(gm, "tanh")) == 1
    assert why_not(results["lower_fused"], "gelu", besides="not tanh or erf") == {"not x + 0.044715 * x^3": 1}
    x = torch.randn(4, 8)
    assert rel_err(gm(x)[0], GeluFormulas()(x)[0]) < 1e-6


class NoKernelOrOtherShape(nn.Module):
    """A linear's bias + GELU, and two residual norms SkipLayerNormalization does not take: a broadcast add, 4-D."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln, self.ln4 = nn.Linear(8, 8), nn.LayerNorm(8), nn.LayerNorm(8)
        self.shift = nn.Parameter(torch.randn(8))

    def forward(self, x, y):
        return self.ln(F.gelu(self.fc(x)) + self.shift), self.ln4(self.fc(y) + y)


def test_on_a_planned_graph_the_target_table_and_the_shapes_say_why_a_rule_did_not_fire():
    model = NoKernelOrOtherShape().eval()
    data = [(torch.randn(4, 8), torch.randn(2, 2, 3, 8)) for _ in range(2)]
    planned = stages(model, data, upto="eliminate_casts")
    (gelu,) = nodes_by_op(planned, "gelu")
    assert record(gelu).dtype == torch.float16
    lowered = {target: twin(planned, "Lowered") for target in ("ort-cpu", "ort-cuda")}
    runs = {target: LowerFused(target=target).run(gm) for target, gm in lowered.items()}
    # ONNX Runtime's CPU provider has BiasGelu in fp32 only, its CUDA provider in f16 too (mpcompiler.fused.KERNELS)
    assert why_not(runs["ort-cpu"], "bias_gelu", besides="not a gelu") == {"ort-cpu has no bias_gelu kernel for f16": 1}
    assert runs["ort-cuda"].stats["bias_gelu"] == 1
    assert why_not(runs["ort-cuda"], "bias_gelu", besides="not a gelu") == {}
    for result in runs.values():
        assert result.stats["skip_layer_norm"] == 0
        assert why_not(result, "skip_layer_norm", besides="not a layer_norm") == {
            "add of differently shaped values (a broadcast)": 1,  # gelu [B, 8] + shift [8]
            "SkipLayerNormalization takes 2-D or 3-D input": 1,  # [B, 2, 3, 8]
        }
    assert not runs["ort-cpu"].modified
    x, y = torch.randn(3, 8), torch.randn(3, 2, 3, 8)
    for got, was in zip(lowered["ort-cpu"](x, y), planned(x, y), strict=True):
        assert torch.equal(got, was)
    for got, ref in zip(lowered["ort-cuda"](x, y), model(x, y), strict=True):
        assert rel_err(got, ref) < TOL[torch.float16]


def test_resnet_has_nothing_to_fuse_before_planning():
    gm = stages(torchvision.models.resnet18().eval(), [torch.randn(2, 3, 64, 64)], upto="fold_batch_norm")
    assert not any(LowerFused(target="fx-cuda").run(gm).stats.values())
    assert not has_kernel("conv_bias_relu", "fx-cuda", None)
    assert not has_kernel("conv_bias_relu", "fx-cpu", torch.float16)


def _cuda_lowered(compiled):
    gm = twin(compiled.graph_module, "Lowered")
    return gm, LowerFused(target="fx-cuda").run(gm).stats["conv_bias_relu"]


def test_resnet_conv_bias_relu_fuses_for_cuda_graphs_and_keeps_the_numbers():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # fresh ones fold to zero biases
        bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5), bn.bias.data.normal_(0, 0.1)
    compiled = mpcompiler.compile(model, [torch.randn(2, 3, 64, 64) for _ in range(2)])
    gm, fused = _cuda_lowered(compiled)
    # the stem, and per basic block conv1 + relu and conv2 + residual add + relu
    assert fused == 1 + 8 * 2
    assert len(nodes_by_op(gm, "mpcompiler.conv_bias_relu")) == fused
    assert not nodes_by_op(compiled.graph_module, "mpcompiler.conv_bias_relu")  # the compiled module keeps its graph
    # the three downsampling convs' biases join the fused convs' that add their outputs
    downsampling = nodes_by_op(gm, "conv2d")
    assert len(downsampling) == 3 and all(len(c.args) < 3 or c.args[2] is None for c in downsampling)
    summed = [f for f in nodes_by_op(gm, "mpcompiler.conv_bias_relu") if f.args[3] in downsampling]
    assert len(summed) == 3 and all(f.args[2].target.endswith("conv2.bias_with_residual") for f in summed)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # the CPU kernel is the same ops, but the two biases are summed before rounding: the fp16 plan's numbers
        assert rel_err(gm(x), model(x)) < TOL[planned_dtype(downsampling[0])]
        assert rel_err(gm(x), compiled(x)) < TOL[planned_dtype(downsampling[0])]


class _ConvRelu(nn.Module):
    def __init__(self, shared: bool):
        super().__init__()
        self.conv, self.shared = nn.Conv2d(3, 4, 3, padding=1), shared

    def forward(self, x):
        y = self.conv(x)
        return (torch.relu(y), y) if self.shared else torch.relu(y)


@pytest.mark.parametrize(
    "model,options",
    [(_ConvRelu(shared=True), {}), (_ConvRelu(shared=False), {"keep_fp32": "relu"})],
    ids=["conv read twice", "relu in fp32"],
)
def test_conv_bias_relu_does_not_fuse_where_the_pattern_differs(model, options):
    compiled = mpcompiler.compile(model.eval(), [torch.randn(2, 3, 8, 8) for _ in range(2)], **options)
    assert _cuda_lowered(compiled)[1] == 0


def _onnx_ops(path):
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def test_bert_onnx_for_ort_cuda_has_fused_attention_skip_layer_norm_and_bias_gelu(tmp_path):
    compiled = mpcompiler.compile(
        _bert(), [_bert_sample(b, s) for b, s in [(4, 16), (2, 24), (3, 20), (2, 8), (3, 12)]]
    )
    fx_code = compiled.graph_module.code
    art = compiled.export_onnx(tmp_path / "b.onnx")
    assert compiled.graph_module.code == fx_code  # the ONNX lowering ran on a copy
    ops = _onnx_ops(tmp_path / "b.onnx")
    assert ops["Attention"] == 2 and ops["Softmax"] == 0 and ops["Transpose"] == 0
    attention = [n for n in onnx.load(tmp_path / "b.onnx").graph.node if n.op_type == "Attention"]
    assert {n.domain for n in attention} == {"com.microsoft"}
    assert all(len(n.output) == 1 for n in attention)  # no `present`: ORT's CUDA fused attention needs none
    assert ops["MatMul"] == 6  # per layer: attention's output projection, the MLP's two (q, k, v inside Attention)
    assert ops["SkipLayerNormalization"] == 4  # after attention and after the MLP, per layer
    assert ops["BiasGelu"] == 2
    assert ops["EmbedLayerNormalization"] == 1 and ops["LayerNormalization"] == 0  # the embeddings' gathers + norm
    assert max(art.error_vs_fp32.values()) < TOL[torch.float16]
    fused = [n for n in onnx.load(tmp_path / "b.onnx").graph.node if n.op_type == "SkipLayerNormalization"]
    props = {p.key: p.value for p in fused[0].metadata_props}
    assert props["mpcompiler.module_path"].endswith("LayerNorm") and props["mpcompiler.dtype"] == "f16"

    # the CPU provider has BiasGelu in fp32 only: an fp16 artifact for it keeps linear + Gelu
    compiled.export_onnx(tmp_path / "c.onnx", target="ort-cpu")
    cpu_ops = _onnx_ops(tmp_path / "c.onnx")
    assert cpu_ops["BiasGelu"] == 0 and cpu_ops["SkipLayerNormalization"] == 4
    assert not has_kernel("bias_gelu", "ort-cpu", torch.float16)


def test_a_model_without_attention_exports_at_opset_20_with_its_fused_ops(tmp_path):
    # ORT's CUDA provider runs opset-23 convolutions slower, and the contrib ops need no opset 23
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(288, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    compiled = mpcompiler.compile(model, [torch.randn(2, 3, 8, 8) for _ in range(5)])
    compiled.export_onnx(tmp_path / "m.onnx")
    assert _onnx_ops(tmp_path / "m.onnx")["BiasGelu"] == 1
    assert {o.domain: o.version for o in onnx.load(tmp_path / "m.onnx").opset_import}[""] == 20


def test_gpt2_residual_read_twice_is_not_a_skip_layer_norm(tmp_path):
    compiled = mpcompiler.compile(_gpt2(), [{"input_ids": torch.randint(0, 1000, (2, s))} for s in (8, 12, 16, 10, 14)])
    compiled.export_onnx(tmp_path / "g.onnx")
    ops = _onnx_ops(tmp_path / "g.onnx")
    # in a pre-norm block the residual sum feeds the next layer norm and the next residual: only the
    # final ln_f reads an add nothing else reads
    assert ops["SkipLayerNormalization"] == 1 and ops["LayerNormalization"] == 4 and ops["Attention"] == 2


def test_additive_mask_is_clamped_so_attention_stays_fp16_and_masked_rows_stay_finite():
    model = _bert("eager")
    calib = [_bert_sample(b, s) for b, s in [(4, 16), (2, 24), (3, 20)]]
    compiled = mpcompiler.compile(model, calib)
    sdpa = [n for n in compiled.report.nodes if n.op == "scaled_dot_product_attention"]
    assert [n.dtype for n in sdpa] == ["float16", "float16"]
    # the clamp is a node mpcompiler inserted, not a cast: the report neither counts it as one nor as a model op
    clamps = [n for n in compiled.report.nodes if n.op == "clamp"]
    assert clamps and all(n.inserted and not n.inserted_cast and n.rule == "clamp" for n in clamps)
    assert compiled.report.casts() == sum(n.op == "_to_copy" and n.inserted_cast for n in compiled.report.nodes)
    assert not any(n.op == "clamp" for n in compiled.report.ops())
    held = _bert_sample(3, 10)
    held["attention_mask"][1] = 0  # a row with every key masked
    with torch.no_grad():
        ref = model(**held).last_hidden_state
    out = compiled(**held).last_hidden_state
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float16]


def test_dead_nodes_it_removes_are_gone_from_the_code_too():
    # dynamo maps the generated code's lines to graph nodes: code left stale by a removal crashes it
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(x):
        gm.graph.call_function(torch.neg, (x,))  # dead
    gm.recompile()
    assert "neg" in gm.code
    assert LowerFused(target="fx-cuda").run(gm).modified
    assert "neg" not in gm.code
    torch.testing.assert_close(torch.compile(gm, backend="eager")(torch.ones(2, 4)), gm(torch.ones(2, 4)))


class _Projections(nn.Module):
    """q, k, v of one input (k kept fp32 below), and a gated MLP's gate and up."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(32, n, bias=False) for n in (32, 16, 16))
        self.gate, self.up, self.down = nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        h = self.q(x) + torch.cat([self.k(x), self.v(x)], -1) + self.v(x).repeat(1, 1, 2)
        return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def test_linears_of_one_input_in_one_dtype_become_one_linear_on_shared_weights():
    torch.manual_seed(0)
    model, x = _Projections().eval(), torch.randn(4, 6, 32)
    compiled = mpcompiler.compile(model, [torch.randn(4, 6, 32) for _ in range(4)], keep_fp32=["k"])
    gm = twin(compiled.graph_module, "Fused")
    stats = LowerFused(target="fx-cpu").run(gm).stats
    assert stats["shared_input_linears"] == 2  # q + v (k is fp32, v's second call repeats v), gate + up
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    joined = [n for n in linears if n.args[1].target.endswith("_fused")]
    assert len(linears) == 5 and len(joined) == 2 and all("one linear" in record(n).fused for n in joined)
    torch.testing.assert_close(gm(x), compiled(x), rtol=1e-3, atol=1e-3)
    assert rel_err(gm(x), model(x)) < TOL[torch.float16]
    # the compiled module's weights are views of the stacked ones: no second copy
    fused = gm.get_buffer("q.weight_fused")
    q, v = compiled.graph_module.get_parameter("q.weight"), compiled.graph_module.get_parameter("v.weight")
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def test_linears_are_not_joined_before_precision_planning():
    gm = torch.export.export(_Projections().eval(), (torch.randn(2, 3, 32),)).module()
    assert LowerFused(target="fx-cpu").run(gm).stats["shared_input_linears"] == 0


def test_rms_norm_and_its_residual_add_become_one_op_for_onnx_runtime_in_their_planned_dtype():
    from mpcompiler.passes.lower_fused import _match_rms_norm
    from tests.test_llm import _llama, _prompt

    model = _llama()
    calib = [_prompt(2, n) | {"use_cache": False} for n in (6, 9, 7, 8, 5)]
    compiled = mpcompiler.compile(model, calib, keep_fp32=["model.norm"])  # the final norm fp32
    gm = twin(compiled.graph_module, "Fused")
    matches = {n: _match_rms_norm(n) for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor}
    weights = {n: m["weight"] for n, m in matches.items() if isinstance(m, dict)}
    # x, weight and output must share a dtype (ONNX Runtime's CPU kernel has one type for them): not fused otherwise
    final = next(n for n in weights if "model.norm" in record(n).module_path)
    record(weights[final]).dtype = torch.float16
    assert _match_rms_norm(final) == "x, weight and output in different dtypes"
    record(weights[final]).dtype = torch.float32
    stats = LowerFused(target="ort-cpu").run(gm).stats
    assert stats["rms_norm"] == 5  # before attention and MLP in 2 layers, and the final norm
    # a norm of the residual add joins it (the sum an output too), the operands in its dtype: not the first
    # layer's (of the embeddings) nor the fp32 final norm (of an fp16 sum)
    assert stats["skip_rms_norm"] == 3
    norms = [n for n in gm.graph.nodes if n.target is torch.ops.mpcompiler.rms_norm.default]
    assert [record(n).dtype for n in norms] == [torch.float16, torch.float32]
    held = _prompt(3, 10) | {"use_cache": False}
    with torch.no_grad():
        ref = model(**held).logits
    assert (
        rel_err(gm(**held).logits, compiled(**held).logits) < 1e-3
        and rel_err(gm(**held).logits, ref) < TOL[torch.float16]
    )


class _CrossAttention(nn.Module):
    """q from x, k and v from y: a self-attention only when y is x."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))

    def forward(self, x, y=None):
        y = x if y is None else y
        heads = lambda t: t.unflatten(-1, (4, 8)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(y)), heads(self.v(y)))
        return out.transpose(1, 2).flatten(2)


def test_self_attention_becomes_one_packed_attention_for_onnx_runtime_exact_for_left_padding(tmp_path):
    from mpcompiler.passes.lower_fused import _match_qkv_attention

    model = _bert()
    compiled = mpcompiler.compile(model, [_bert_sample(b, s) for b, s in [(4, 16), (2, 24), (3, 20), (2, 8)]])
    gm = twin(compiled.graph_module, "Fused")
    assert LowerFused(target="ort-cpu").run(gm).stats["qkv_attention"] == 2
    fused = nodes_by_op(gm, "mpcompiler.qkv_attention")
    assert [record(n).dtype for n in fused] == [torch.float16] * 2 and "packed QKV" in record(fused[0]).fused
    assert gm.get_buffer("encoder.layer.0.attention.self.qkv_weight").shape == (128, 384)  # [in, q | k | v]
    held = _bert_sample(3, 10)
    held["attention_mask"][1, :4] = 0  # left padding: the mask goes in whole, no padding side assumed
    with torch.no_grad():
        ref = model(**held).last_hidden_state
    assert rel_err(gm(**held)[0], compiled(**held).last_hidden_state) < 1e-3
    art = compiled.export_onnx(tmp_path / "b.onnx", target="ort-cpu")
    assert _onnx_ops(tmp_path / "b.onnx")["Attention"] == 2 and art.verified_with == "CPUExecutionProvider"
    sess = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(["last_hidden_state"], {k: v.numpy() for k, v in held.items()})[0]
    assert rel_err(torch.from_numpy(out), ref) < TOL[torch.float16]

    # padding="right": each row's length as Attention's 1-D mask index (ONNX Runtime's fused kernels)
    art = compiled.export_onnx(tmp_path / "r.onnx", target="ort-cpu", padding="right")
    m = onnx.load(tmp_path / "r.onnx")
    attention = [n for n in m.graph.node if n.op_type == "Attention"]
    assert len(attention) == 2 and all(len(n.input) == 4 and n.input[3] for n in attention)  # no attention_bias
    # the index is the attention_mask input's row sums: HF's mask-building ops are gone
    producers = {o: n for n in m.graph.node for o in n.output}
    counts = producers[attention[0].input[3]]
    assert counts.op_type == "ReduceSum" and producers[counts.input[0]].input[0] == "attention_mask"
    assert not {"Range", "GatherND", "And", "GreaterOrEqual"} & set(_onnx_ops(tmp_path / "r.onnx"))
    assert {p.key: p.value for p in m.metadata_props}["mpcompiler.padding"] == "right"
    assert "Padding: right" in art.handoff.read_text()
    sess = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    right = _bert_sample(3, 10)
    right["attention_mask"][1, 6:] = 0
    with torch.no_grad():
        ref = model(**right).last_hidden_state
    out = sess.run(["last_hidden_state"], {k: v.numpy() for k, v in right.items()})[0]
    assert rel_err(torch.from_numpy(out), ref) < TOL[torch.float16]  # padded queries too: they attend the row's keys
    out = sess.run(["last_hidden_state"], {k: v.numpy() for k, v in held.items()})[0]
    assert (
        rel_err(torch.from_numpy(out[1]), model(**held).last_hidden_state[1].detach()) > TOL[torch.float16]
    )  # the contract
    left = mpcompiler.compile(model, [_bert_sample(4, 16), _bert_sample(2, 24)], val_data=[held])
    with pytest.raises(mpcompiler.ExportError, match="padding='right'.*reads each row's length only"):
        left.export_onnx(tmp_path / "l.onnx", target="ort-cpu", padding="right")
    assert not (tmp_path / "l.onnx").exists()

    torch.manual_seed(0)
    cross = mpcompiler.compile(_CrossAttention().eval(), [(torch.randn(2, 6, 32), torch.randn(2, 5, 32))] * 4)
    sdpa = nodes_by_op(cross.graph_module, "scaled_dot_product_attention")[0]
    assert _match_qkv_attention(sdpa) == "q, k and v are not three linears of one input"
    own = mpcompiler.compile(_CrossAttention().eval(), list(torch.randn(4, 2, 6, 32)))
    sdpa = nodes_by_op(own.graph_module, "scaled_dot_product_attention")[0]
    assert isinstance(_match_qkv_attention(sdpa), dict)  # the same module as a self-attention, in other spellings


class _Embeddings(nn.Module):
    """BERT's embeddings with positions from a buffer, optionally offset (RoBERTa counts from 2)."""

    def __init__(self, offset=0):
        super().__init__()
        self.word, self.pos, self.norm = nn.Embedding(50, 16), nn.Embedding(40, 16), nn.LayerNorm(16)
        self.head = nn.Linear(16, 16)  # a compute-bound op: without one the plan stays fp32 (fewer casts)
        self.register_buffer("position_ids", torch.arange(40)[None] + offset, persistent=False)

    def forward(self, input_ids):
        return self.head(self.norm(self.word(input_ids) + self.pos(self.position_ids[:, : input_ids.shape[1]])))


@pytest.mark.parametrize("segments", ["input", "zeros"])
def test_bert_embeddings_become_one_embed_layer_norm_for_onnx_runtime(segments, tmp_path):
    from mpcompiler.passes.lower_fused import _match_embed_layer_norm

    model = _bert()
    samples = [_bert_sample(b, s) for b, s in [(4, 16), (2, 24), (3, 20), (2, 8)]]
    if segments == "input":  # the segment ids a gathered input, else HF's all-zero buffer
        samples = [s | {"token_type_ids": (torch.arange(s["input_ids"].shape[1]) >= 4).long().expand(
            s["input_ids"].shape)} for s in samples]  # fmt: skip
    compiled = mpcompiler.compile(model, samples)
    gm = twin(compiled.graph_module, "Fused")
    assert LowerFused(target="ort-cpu").run(gm).stats["embed_layer_norm"] == 1
    (fused,) = nodes_by_op(gm, "mpcompiler.embed_layer_norm")
    assert record(fused).dtype == torch.float16 and fused.args[0].name == "input_ids"
    assert (fused.args[1] is not None) == (segments == "input")  # zeros: folded into the position table
    held = samples[0]
    with torch.no_grad():
        ref = model(**held).last_hidden_state
    assert (
        rel_err(gm(**held)[0], compiled(**held).last_hidden_state) < 1e-3
        and rel_err(gm(**held)[0], ref) < TOL[torch.float16]
    )
    art = compiled.export_onnx(tmp_path / "e.onnx", target="ort-cpu")
    ops = _onnx_ops(tmp_path / "e.onnx")
    assert ops["EmbedLayerNormalization"] == 1 and ops["LayerNormalization"] == 0 and ops["Gather"] <= 1  # pooler's
    assert max(art.error_vs_fp32.values()) < TOL[torch.float16]

    offset = mpcompiler.compile(_Embeddings(offset=2).eval(), [torch.randint(0, 50, (2, s)) for s in (6, 9, 12)])
    (ln,) = nodes_by_op(offset.graph_module, "layer_norm")
    assert _match_embed_layer_norm(ln) == "not ids, positions 0..S-1 and segment ids (an input or all zeros)"
    plain = mpcompiler.compile(_Embeddings().eval(), [torch.randint(0, 50, (2, s)) for s in (6, 9, 12)])
    assert isinstance(_match_embed_layer_norm(nodes_by_op(plain.graph_module, "layer_norm")[0]), dict)
    big = _Embeddings().eval()
    big.word.weight.data *= 100  # |x| ~ 300: fp16 holds it, not the squares ORT's kernel sums in fp16
    big = mpcompiler.compile(big, [torch.randint(0, 50, (2, s)) for s in (6, 9, 12)])
    assert "square past half the dtype's max" in _match_embed_layer_norm(nodes_by_op(big.graph_module, "layer_norm")[0])


def test_segment_ids_broadcast_over_the_batch_keep_the_plain_embeddings(tmp_path):
    from mpcompiler.passes.lower_fused import _match_embed_layer_norm

    # EmbedLayerNormalization takes segment ids shaped as the input ids only (ORT: "Input 0 and 1 shall
    # have same shape"); [1, S] token types broadcast in the model's add
    samples = [_bert_sample(b, s) for b, s in [(4, 16), (2, 24), (3, 20)]]
    samples = [s | {"token_type_ids": torch.zeros(1, s["input_ids"].shape[1], dtype=torch.long)} for s in samples]
    compiled = mpcompiler.compile(_bert(), samples)
    (ln, *_) = nodes_by_op(compiled.graph_module, "layer_norm")
    assert "ids broadcast" in _match_embed_layer_norm(ln)
    art = compiled.export_onnx(tmp_path / "b.onnx", target="ort-cpu")
    assert (
        _onnx_ops(tmp_path / "b.onnx")["EmbedLayerNormalization"] == 0
        and max(art.error_vs_fp32.values()) < TOL[torch.float16]
    )


def test_llama_attention_becomes_group_query_attention_on_the_packed_projection_rotating_itself():
    from mpcompiler.accuracy import flat_outputs
    from mpcompiler.fused import kv_attention
    from mpcompiler.onnx_io import empty_pasts
    from mpcompiler.passes import InsertKvCache
    from mpcompiler.passes.lower_fused import _match_rotary_group_query_attention
    from tests.test_llm import _llama, _prompt

    compiled = mpcompiler.compile(_llama(), [_prompt(2, n) for n in (6, 9, 7, 8)], max_seq=32, max_batch=2)
    ref, gm = (twin(compiled.graph_module, name) for name in ("Ref", "Fused"))
    for g in (ref, gm):
        InsertKvCache(**compiled.lm.__dict__, cache="io").run(g)
    stats = LowerFused(target="ort-cpu").run(gm).stats
    assert stats["rotary_group_query_attention"] == 2 and stats["group_query_attention"] == 0
    assert len([n for n in gm.graph.nodes if n.name.endswith("_table")]) == 2  # cos and sin, once for all layers
    assert not nodes_by_op(gm, "neg")  # rotate_half's: now inside the op
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding: the cache layout's
    feed = {"input_ids": torch.randint(3, 100, (2, 7)), "attention_mask": mask, "use_cache": False}
    feed |= {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} | empty_pasts(ref, 2)
    with torch.no_grad():
        (want, *want_cache), (got, *got_cache) = flat_outputs(ref(**feed)), flat_outputs(gm(**feed))
    real = mask.bool()  # a padding token's position differs (its logits and cache slot are never read)
    assert rel_err(got[real], want[real]) < 2e-3
    for g, w in zip(got_cache, want_cache, strict=True):
        assert rel_err(g[0], w[0]) < 2e-3 and rel_err(g[1, :, :5], w[1, :, :5]) < 2e-3

    attention = next(n for n in ref.graph.nodes if n.target is kv_attention)
    rotated_q = attention.args[0]
    attention.args = (attention.args[1], *attention.args[1:])  # q is k: rotated alike, but k's linear twice
    assert _match_rotary_group_query_attention(attention) == "q, k and v are not three linears of one input"
    attention.args = (rotated_q.args[0].args[0], *attention.args[1:])  # q before its rotation
    assert _match_rotary_group_query_attention(attention) == "q and k are not rotated as x * cos + rotate_half(x) * sin"
