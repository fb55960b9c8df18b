"""channels_last: a model with 2-D convolutions gets its 4-D weights in NHWC, for the CUDA-graph mode.

Convolutions run fastest in NHWC on tensor cores (cuDNN's fused conv + bias [+ residual] + relu kernels,
``lower_fused``'s ``fx-cuda`` rules, take them so). Runs on the CUDA-graph mode's copy of the compiled
graph (:mod:`mpcompiler.cuda_graph`): the weights it converts are that copy's own, so the compiled module
the user holds keeps its layout; the copy costs the conv weights' bytes once more while the mode lives.
"""

from __future__ import annotations

import torch
import torch.fx

from mpcompiler.ir import attr_of, replace_attr
from mpcompiler.pass_manager import Pass, PassResult

_CONVS = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)


def has_conv2d(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        val = node.args[0].meta.get("val") if node.target in _CONVS else None
        if isinstance(val, torch.Tensor) and val.dim() == 4:
            return True
    return False


class ChannelsLast(Pass):
    """Every 4-D weight of a graph with 2-D convolutions as a channels_last copy (the graph is unchanged)."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if not has_conv2d(gm):
            return PassResult(modified=False, stats={"weights": 0})
        converted = 0
        for target in dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "get_attr"):
            value = attr_of(gm, target)
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                prefix, _, name = target.rpartition(".")
                replace_attr(gm.get_submodule(prefix), name, value.detach().to(memory_format=torch.channels_last))
                converted += 1
        return PassResult(modified=converted > 0, stats={"weights": converted})
