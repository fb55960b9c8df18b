"""The deployment handoff beside an ONNX artifact, ``<model>.onnx.json`` and ``<model>.onnx.md``: its inputs
and outputs, dynamic axes, opset and precision, what verified it and the errors measured, the provider
options measured fastest, and a Python snippet that runs it in ONNX Runtime with io_binding (a causal
LM's: a generation loop), as a deployment team pastes it (the tests run it so).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from mpcompiler._version import __version__
from mpcompiler.files import write_atomic
from mpcompiler.ort_verify import import_onnxruntime


def _tensor_info(value: ir.Value) -> dict:
    shape = [d.value if isinstance(d, ir.SymbolicDim) else int(d) for d in (value.shape or ())]
    return {"name": value.name, "dtype": value.dtype.name.lower() if value.dtype else None, "shape": shape}


def write_handoff(path, model, compiled, provider, vs_fp32, vs_fx, io, opset, padding) -> Path:
    """Write ``<path>.json`` and ``<path>.md`` (each atomically) for ``model``, the artifact at ``path``;
    returns the markdown's path."""
    inputs = [_tensor_info(v) for v in model.graph.inputs]
    outputs = [_tensor_info(v) for v in model.graph.outputs]
    report = compiled.report
    info = {
        "model_file": path.name,
        "opset": opset,
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_axes": {
            v["name"]: {k: d for k, d in enumerate(v["shape"]) if isinstance(d, str)} for v in inputs + outputs
        },
        "precision": {
            "dtype": report.dtype,
            "io_dtype": str(io).removeprefix("torch.") if io else "as the model (float32 / int64)",
            "ops_per_dtype": report.counts(),
            "casts": report.casts(),
            "calibration_samples": report.calib_samples,
        },
        "verified_with": {
            "onnxruntime": import_onnxruntime().__version__,
            "provider": provider,
            "samples": len(compiled.val_samples),
            "held_out": report.accuracy.held_out if report.accuracy else None,
        }
        if provider
        else None,
        "padding": "right: each row's attention_mask ones first; attention reads each row's length only"
        if padding == "right"
        else "any: attention takes attention_mask whole",
        "error_vs_fp32": vs_fp32,
        "error_vs_fx_module": vs_fx,
        # fastest measured on ONNX Runtime's CUDA provider (docs/perf.md); CUDA graphs need fixed shapes
        "cuda_provider_options": ({} if compiled.lm else {"enable_cuda_graph": "1"})
        | ({"prefer_nhwc": "1"} if any(node.op_type == "Conv" for node in model.graph) else {}),
        "exported_by": {"mpcompiler": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
    }
    if compiled.lm is not None:
        info["generation"] = {
            "kv_cache": "past_key_values.{i}.key/value in, present.{i}.key/value out: [batch, kv_heads, seq, head_dim]",
            "max_seq_compiled_for": compiled.lm.max_seq,
            # GroupQueryAttention takes one buffer as past and present; the plain ops' cache grows a step
            "shared_cache": any(node.op_type == "GroupQueryAttention" for node in model.graph),
        }
    json_path = path.with_name(path.name + ".json")
    write_atomic(json_path, json.dumps(info, indent=1) + "\n")
    md_path = path.with_name(path.name + ".md")
    write_atomic(md_path, _handoff_markdown(info))
    return md_path


def _handoff_markdown(info: dict) -> str:
    def row(v):
        return f"| `{v['name']}` | {v['dtype']} | [{', '.join(map(str, v['shape']))}] |"

    verified = info["verified_with"]
    lines = [
        f"# {info['model_file']}",
        "",
        f"ONNX opset {info['opset']}, exported by mpcompiler {info['exported_by']['mpcompiler']} "
        f"(torch {info['exported_by']['torch']}). Precision: {info['precision']['dtype']} where the plan says, "
        f"fp32 elsewhere; inputs and outputs {info['precision']['io_dtype']}.",
        "",
        "| input | dtype | shape |",
        "| --- | --- | --- |",
        *[row(v) for v in info["inputs"]],
        "",
        "| output | dtype | shape |",
        "| --- | --- | --- |",
        *[row(v) for v in info["outputs"]],
        "",
        f"Padding: {info['padding']}.",
        "",
        "Named dims are dynamic: "
        + (
            ", ".join(f"`{name}`" for name in sorted({d for a in info["dynamic_axes"].values() for d in a.values()}))
            or "none"
        )
        + ".",
        "",
    ]
    if verified:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in info["error_vs_fp32"].items())
        errs_fx = ", ".join(
            f"{k} {v:.0%}" if k == "greedy_agreement" else f"{k} {v:.2e}" for k, v in info["error_vs_fx_module"].items()
        )
        held = "held-out" if verified["held_out"] else "calibration"
        samples = f"{verified['samples']} {held} sample{'s' if verified['samples'] != 1 else ''}"
        lines += [
            f"Verified with ONNX Runtime {verified['onnxruntime']} ({verified['provider']}) on {samples}: "
            f"relative L2 error vs the fp32 model {errs}; vs mpcompiler's FX module {errs_fx}.",
        ]
    else:
        lines.append("Not verified in ONNX Runtime (see the export's warnings).")
    if "generation" in info:
        lines += [
            "",
            "## Generate (ONNX Runtime, CUDA if it has it, else the CPU; the KV cache stays on the device)",
            "",
            "The KV cache is inputs and outputs, as ONNX Runtime GenAI names them: feed each step's `present.*` "
            "back as the next step's `past_key_values.*`, or, with GroupQueryAttention, bind one buffer as both "
            "(it writes in place; the loop below does). Each row's tokens sit at the front of its cache "
            "(ONNX Runtime's GroupQueryAttention layout): prompts are right-padded, `attention_mask` "
            "[batch, past + new] has a row's ones first (its length is their count), positions count from 0, "
            "and a prompt's next-token logits are at its last real token.",
            "",
            "```python",
            _generation_snippet(info),
            "```",
            "",
        ]
        return "\n".join(lines)
    lines += [
        "",
        "## Run it (ONNX Runtime, CUDA if it has it, else the CPU; inputs and outputs bound on the device)",
        "",
        "```python",
        _snippet(info),
        "```",
        "",
    ]
    return "\n".join(lines)


def _generation_snippet(info: dict) -> str:
    shared = info["generation"]["shared_cache"]
    return f"""import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

# One cache buffer per past input, [batch, kv_heads, MAX_SEQ, head_dim], bound as its present output too
# (GroupQueryAttention writes the new tokens in place; the mask as wide as the buffer), as ONNX Runtime
# GenAI runs such models: every decode step then has the same shapes and addresses, and replays as one
# CUDA graph. Without it, each step's presents are fed back as the next pasts.
SHARED_CACHE = {shared}
MAX_SEQ = {info["generation"]["max_seq_compiled_for"]}  # prompt + new tokens: what the artifact was compiled for
MODEL = "{info["model_file"]}"
STOP_CHECK = 8  # with eos_token_id: decode steps between reads of the new tokens (each read waits for the GPU)
NEXT = {{name: "next." + name for name in ("input_ids", "attention_mask", "position_ids", "tokens")}}


def with_bookkeeping(model):
    # The artifact's step, then the loop's bookkeeping on the device: each row's greedy token (the logits at
    # its last real token), its position (the row's length so far), the mask one slot longer and the token
    # written into the row's [batch, MAX_SEQ] tokens, as next.* outputs. Bound as the next step's inputs,
    # they feed it with nothing copied from the host: the host only launches steps, and reads the tokens
    # every STOP_CHECK steps (with eos_token_id) and at the end.
    graph = model.graph
    assert not {{v.name for v in graph.input}} & {{"tokens", *NEXT.values()}}, "the loop's names are taken"
    const = lambda name, values: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    graph.node.extend([
        const("loop.zero", [0]), const("loop.one", [1]), const("loop.slots", list(range(MAX_SEQ))),
        helper.make_node("ReduceSum", ["attention_mask", "loop.one"], [NEXT["position_ids"]], keepdims=1),
        helper.make_node("Slice", ["position_ids", "loop.zero", "loop.one", "loop.one"], ["loop.first"]),  # [:, :1]
        helper.make_node("Sub", [NEXT["position_ids"], "loop.one"], ["loop.last_position"]),
        helper.make_node("Sub", ["loop.last_position", "loop.first"], ["loop.last"]),  # index in this step's logits
        helper.make_node("Cast", [graph.output[0].name], ["loop.logits"], to=TensorProto.FLOAT),
        helper.make_node("ArgMax", ["loop.logits"], ["loop.greedy"], axis=-1, keepdims=0),
        helper.make_node("GatherElements", ["loop.greedy", "loop.last"], [NEXT["input_ids"]], axis=1),
        helper.make_node("Add", [NEXT["position_ids"], "loop.one"], ["loop.length"]),
        helper.make_node("Less", ["loop.slots", "loop.length"], ["loop.mask"]),
        helper.make_node("Cast", ["loop.mask"], [NEXT["attention_mask"]], to=TensorProto.INT64),
        helper.make_node("ScatterElements", ["tokens", NEXT["position_ids"], NEXT["input_ids"]], [NEXT["tokens"]],
                         axis=1),
    ])
    graph.input.append(helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch_size", MAX_SEQ]))
    width = {{"input_ids": 1, "position_ids": 1, "attention_mask": MAX_SEQ, "tokens": MAX_SEQ}}
    graph.output.extend(helper.make_tensor_value_info(NEXT[k], TensorProto.INT64, ["batch_size", n])
                        for k, n in width.items())
    return model


cuda = "CUDAExecutionProvider" in ort.get_available_providers()
options = ort.SessionOptions()  # the artifact's weights (external data, if any) read from its folder
options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                 os.path.dirname(os.path.abspath(MODEL)))
graphs = {{"enable_cuda_graph": "1"}} if SHARED_CACHE else {{}}
providers = [("CUDAExecutionProvider", graphs)] if cuda else ["CPUExecutionProvider"]
sess = ort.InferenceSession(with_bookkeeping(onnx.load(MODEL, load_external_data=False)).SerializeToString(),
                            options, providers=providers)
device = "cuda" if cuda else "cpu"
pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
logits_out = sess.get_outputs()[0]
DTYPES = {{"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(bfloat16)": "bfloat16"}}
EAGER = ort.RunOptions()
EAGER.add_run_config_entry("gpu_graph_id", "-1")  # a prompt's shapes vary: never captured


def on_device(x):
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), device, 0)


def zeros(shape, dtype=np.int64):
    if dtype == "bfloat16":  # numpy has none: ONNX Runtime's own buffer, zeroed through its 16-bit patterns
        value = ort.OrtValue.ortvalue_from_shape_and_type(shape, TensorProto.BFLOAT16, device, 0)
        value.update_inplace(np.zeros(shape, np.uint16))
        return value
    return on_device(np.zeros(shape, dtype))


def step_inputs(batch):  # a decode step's inputs, and the tokens so far, on the device
    return {{"input_ids": zeros((batch, 1)), "attention_mask": zeros((batch, MAX_SEQ)),
            "position_ids": zeros((batch, 1)), "tokens": zeros((batch, MAX_SEQ))}}


def bind(feeds, cache, logits, after):
    # the step on feeds and cache; its next.* outputs written into ``after``, the next step's inputs
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_ortvalue_output("logits", logits) if logits is not None else binding.bind_output("logits", device)
    for name, value in cache.items():
        binding.bind_ortvalue_input(name, value)
        present = name.replace("past_key_values.", "present.")
        binding.bind_ortvalue_output(present, value) if SHARED_CACHE else binding.bind_output(present, device)
    for name, value in after.items():
        binding.bind_ortvalue_output(NEXT[name], value)
    return binding


_decoders = {{}}  # batch -> its cache, two sets of step inputs and the decode graph of each: kept, so graphs replay


def decoder(batch):
    if batch not in _decoders:
        cache = {{p.name: zeros((batch, p.shape[1], MAX_SEQ, p.shape[3]), DTYPES[p.type]) for p in pasts}}
        sets, logits, steps = [step_inputs(batch), step_inputs(batch)], zeros((batch, 1, logits_out.shape[-1]),
                                                                             DTYPES[logits_out.type]), []
        for i in (0, 1):  # a step reads set i and writes set 1 - i: two CUDA graphs, replayed in turn
            launch, wait = ort.RunOptions(), ort.RunOptions()
            for run in (launch, wait):
                run.add_run_config_entry("gpu_graph_id", str(2 * batch + i))
            launch.add_run_config_entry("disable_synchronize_execution_providers", "1")  # returns once queued
            steps.append((bind(sets[i], cache, logits, sets[1 - i]), launch, wait))
        _decoders[batch] = cache, sets, steps
    return _decoders[batch]


def generate(input_ids, attention_mask, max_new_tokens, eos_token_id=None):
    # greedy tokens after int64 prompts [batch, seq], padded on either side; returns prompts + new tokens.
    # The cache keeps each row's tokens at its front (GroupQueryAttention's layout): prompts go right-padded.
    batch, width = input_ids.shape
    if width + max_new_tokens > MAX_SEQ:
        raise ValueError(f"{{width}} prompt + {{max_new_tokens}} new tokens is past the {{MAX_SEQ}} compiled for")
    lengths = attention_mask.sum(-1)
    ids = np.take_along_axis(input_ids, np.argsort(attention_mask == 0, -1, kind="stable"), -1)
    if SHARED_CACHE:
        cache, sets, steps = decoder(batch)
    else:
        cache = {{p.name: zeros((batch, p.shape[1], 0, p.shape[3]), DTYPES[p.type]) for p in pasts}}
        sets = [step_inputs(batch), step_inputs(batch)]
    prompt = {{"input_ids": ids, "attention_mask": np.arange(width) < lengths[:, None],
              "position_ids": np.broadcast_to(np.arange(width), ids.shape)}}
    feeds = {{k: on_device(v.astype(np.int64)) for k, v in prompt.items()}} | {{"tokens": sets[1]["tokens"]}}
    binding = bind(feeds, cache, None, sets[0])  # the first new token and the first decode step's inputs
    sess.run_with_iobinding(binding, EAGER)

    def tokens(count):  # each row's first ``count`` new tokens: in the set the last step wrote, after its prompt
        written = sets[(count - 1) % 2]["tokens"].numpy()  # on the CPU a view of a buffer steps write: copied
        return np.take_along_axis(written, lengths[:, None] + np.arange(count), 1)

    count = 1  # new tokens so far; token k (from 1) is in set (k - 1) % 2
    while count < max_new_tokens:
        check = eos_token_id is not None and (count + 1) % STOP_CHECK == 0
        if SHARED_CACHE:  # the step queued; waited for only where the host reads the tokens next
            binding, launch, wait = steps[(count - 1) % 2]
            sess.run_with_iobinding(binding, wait if check or count + 1 == max_new_tokens else launch)
        else:  # the presents in the order bound, after the logits; the mask as wide as the cache
            cache = dict(zip(cache, binding.get_outputs()[1:]))
            feeds = sets[(count - 1) % 2] | {{"attention_mask": on_device(
                (np.arange(width + count) < lengths[:, None] + count).astype(np.int64))}}
            binding = bind(feeds, cache, None, sets[count % 2])
            sess.run_with_iobinding(binding, EAGER)
        count += 1
        if check and np.isin(tokens(count), eos_token_id).any(1).all():
            break
    new = tokens(count)
    if eos_token_id is not None:  # up to the step where the last row stopped, as if checked every step
        stopped = np.isin(new, eos_token_id)
        if stopped.any(1).all():
            new = new[:, : stopped.argmax(1).max() + 1]
    return np.concatenate([input_ids, new], 1)"""


def _snippet(info: dict) -> str:
    np_types = {
        "float": "np.float32",
        "float16": "np.float16",
        "int64": "np.int64",
        "int32": "np.int32",
        "bool": "np.bool_",
    }
    feeds = "\n".join(
        f'binding.bind_ortvalue_input("{v["name"]}", ort.OrtValue.ortvalue_from_numpy(\n'
        f"    np.ascontiguousarray({v['name']}, dtype={np_types.get(v['dtype'], 'np.float32')}), device, 0))"
        for v in info["inputs"]
    )
    outs = "\n".join(f'binding.bind_output("{v["name"]}", device)' for v in info["outputs"])
    return (
        "import numpy as np\nimport onnxruntime as ort\n\n"
        "# CUDA where this onnxruntime has it (onnxruntime-gpu), else the CPU\n"
        'device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"\n'
        "# fastest measured; enable_cuda_graph needs the same input shapes on every run of a session\n"
        f"options = {info['cuda_provider_options']}\n"
        'providers = [("CUDAExecutionProvider", options)] if device == "cuda" else ["CPUExecutionProvider"]\n'
        f'sess = ort.InferenceSession("{info["model_file"]}", providers=providers)\n'
        "binding = sess.io_binding()\n"
        f"# {', '.join(v['name'] for v in info['inputs'])}: numpy arrays shaped as in the table above\n"
        f"{feeds}\n{outs}\n"
        "sess.run_with_iobinding(binding)\n"
        f"[{', '.join(v['name'] for v in info['outputs'])}] = binding.copy_outputs_to_cpu()"
    )
