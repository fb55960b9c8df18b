"""The ONNX artifact's inputs and outputs: their names (the model's, ONNX Runtime GenAI's for a causal LM's
KV cache and dims), and the tensors fed to them: the export's example and a causal LM's past keys and
values. The export (emit_onnx) and the verification (ort_verify) both feed the artifact, so both use these.
"""

from __future__ import annotations

import re

import onnx_ir as ir
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.export import Dim

from mpcompiler.samples import model_device, to_device

# a causal LM's dims as ONNX Runtime GenAI's models name them
GENAI_DIMS = {
    ("input_ids", 0): "batch_size",
    ("input_ids", 1): "sequence_length",
    ("attention_mask", 1): "total_sequence_length",
    ("position_ids", 0): "batch_size",  # torch.export may give these their own symbols: they are input_ids' dims
    ("position_ids", 1): "sequence_length",
    ("past_key_values.0.key", 2): "past_sequence_length",
}


def onnx_input_name(name: str) -> str:
    """An FX input's name in the artifact: a KV cache input ``past_key_values_0_key`` is
    ``past_key_values.0.key``, ONNX Runtime GenAI's name (FX names cannot hold dots)."""
    match = re.fullmatch(r"past_key_values_(\d+)_(key|value)", name or "")
    return f"past_key_values.{match.group(1)}.{match.group(2)}" if match else name


def name_io(model: ir.Model, names: list[str], dim_names: dict) -> None:
    """Outputs take the model's names; symbolic dims become ``<input>_dim<k>`` by first appearance,
    or the name ``dim_names`` gives (input, k)."""
    graph = model.graph
    for value in graph.inputs:
        value.name = onnx_input_name(value.name)
    if len(graph.outputs) == len(names):
        for value, name in zip(graph.outputs, names, strict=True):
            if value.name != name and not any(v.name == name for v in graph.inputs):
                value.name = name
    dims: dict[str, str] = {}
    for value in graph.inputs:
        for k, d in enumerate(value.shape or ()):
            if isinstance(d, ir.SymbolicDim) and d.value not in dims:
                dims[d.value] = dim_names.get((value.name, k), f"{value.name}_dim{k}")
    values = [*graph.inputs, *graph.outputs, *(v for node in graph for v in node.outputs)]
    for value in values:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) for d in value.shape):
            value.shape = ir.Shape([_rename(d, dims) for d in value.shape])


def _rename(d, dims: dict[str, str]):
    if not isinstance(d, ir.SymbolicDim) or d.value is None:
        return d
    return re.sub(r"\b[su]\d+\b", lambda m: dims.get(m.group(0), m.group(0)), d.value)


def example(compiled, io: torch.dtype | None) -> tuple[tuple, dict]:
    """The export's example: the first held-out sample, on the module's device, its floats in ``io``."""
    device = model_device(compiled.graph_module)
    sample = to_device(compiled.val_samples[0], device)
    return with_io_dtype(sample, io) if io is not None else sample


def with_io_dtype(tree, dtype: torch.dtype):
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.dtype.is_floating_point else t, tree)


def with_pasts(program, kwargs: dict, dynamic_shapes: dict, length: int = 4) -> tuple[dict, dict]:
    """A causal LM's example with ``length`` past tokens (export needs a size past 1 to keep it dynamic),
    and its dynamic dims: the pasts' batch and length, the mask's total length."""
    batch = kwargs["input_ids"].shape[0]
    mask = kwargs["attention_mask"]
    kwargs = (
        kwargs
        | {"attention_mask": torch.cat([mask.new_ones(batch, length), mask], 1)}
        | empty_pasts(program, batch, length)
    )
    past = Dim("past_sequence_length")  # one length for every layer's past keys and values
    dims = {n.target: {0: Dim.AUTO, 2: past} for n in _pasts(program)}
    return kwargs, dict(dynamic_shapes) | dims


def empty_pasts(program, batch: int, length: int = 0) -> dict[str, torch.Tensor]:
    """Zero past keys and values of ``length`` tokens for each past input of ``program``."""
    pasts = {}
    for node in _pasts(program):
        val = node.meta["val"]
        shape = (batch, int(val.shape[1]), length, int(val.shape[3]))
        pasts[node.target] = torch.zeros(shape, dtype=val.dtype, device=model_device(program))
    return pasts


def _pasts(program: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in program.graph.nodes if n.op == "placeholder" and n.target.startswith("past_key_values_")]
