"""Emit the FX artifact: a plain ``torch.fx.GraphModule`` holding the rewritten graph.

Its parameters are stored in their planned dtypes (no per-call casts of weights), its forward has the
model's signature and output structure (torch.export's pytree codegen), and it runs on CPU and CUDA
and under ``torch.compile``.
"""

from __future__ import annotations

import copy

import torch
import torch.fx

from mpcompiler.ir import META_KEY, replace_attr


def emit_fx(gm: torch.fx.GraphModule, model: torch.nn.Module) -> torch.fx.GraphModule:
    """A fresh GraphModule over ``gm``'s graph (the exported module's wrapper class refuses .eval()),
    owning its weights: a tensor still shared with ``model`` (one the plan left in its dtype) is
    copied, so that the model's later moves or edits do not reach the compiled module."""
    shared = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    for module in gm.modules():
        for name, value in (
            list(vars(module).items()) + list(module._parameters.items()) + list(module._buffers.items())
        ):
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in shared:
                replace_attr(module, name, value.detach().clone())
    out = torch.fx.GraphModule(gm, gm.graph, class_name="MpCompiledModule")
    out.meta[META_KEY] = gm.meta[META_KEY]
    out.eval()
    out.requires_grad_(False)
    return out


def retarget(gm: torch.fx.GraphModule, device: torch.device) -> None:
    """Move ``gm`` to ``device``, including device constants the export burnt into the graph."""
    for node in gm.graph.nodes:
        if "device" in node.kwargs and node.kwargs["device"] is not None:
            node.kwargs = {**node.kwargs, "device": device}
        if node.target is torch.ops.aten.to.device:
            node.args = (node.args[0], device, *node.args[2:])
    gm.recompile()
    gm.to(device)


def twin(gm: torch.fx.GraphModule, class_name: str) -> torch.fx.GraphModule:
    """A copy of ``gm``'s graph over the same weights, for rewrites one artifact makes for its target
    (ONNX Runtime's fused ops, cuDNN's fused convolutions) that the compiled module keeps out of."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = copy.copy(gm.graph._codegen)  # its own calling convention: a rewrite may add inputs
    out = torch.fx.GraphModule(gm, graph, class_name=class_name)
    out.meta[META_KEY] = gm.meta[META_KEY]
    return out
