"""fold_batch_norm: fold inference batch norm into the conv or linear that feeds it, at compile time.

    y = (conv(x, W, b) - mean) / sqrt(var + eps) * gamma + beta
      = conv(x, W * s, (b - mean) * s + beta)          with s = gamma / sqrt(var + eps)

The folded weights are computed in float64 and stored in the weights' dtype (fp32), before any
precision decision: the later fp16 cast rounds the folded weight once. A batch norm is folded only
when it is the sole reader of a conv/linear whose weight nothing else reads, with constant
statistics; others stay (and run with fp16 I/O and fp32 parameters). Both spellings of an inference
batch norm are folded: ``batch_norm(..., training=False)`` as torch.export writes it, and
``_native_batch_norm_legit_no_training(...)[0]`` as it reads once a model with in-place ops is
functionalized (capture).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from mpcompiler.ir import attr_of, op_name, record
from mpcompiler.ops import bound_args
from mpcompiler.pass_manager import Pass, PassResult
from mpcompiler.rewrite import Match, RewriteRule, apply

_FOLDABLE = {"conv1d", "conv2d", "conv3d", "linear"}


def _constant(gm, node) -> torch.Tensor | None:
    return attr_of(gm, node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def _match(out: torch.fx.Node) -> Match | str:
    """A foldable inference batch norm whose output is ``out``: its conv/linear, weights and statistics."""
    bn = _batch_norm(out)
    if bn is None:
        return "not an inference batch norm"
    gm, a = out.graph.owning_module, bound_args(bn)
    producer = a["input"]
    if a.get("training") or not isinstance(producer, torch.fx.Node) or op_name(producer) not in _FOLDABLE:
        return "not fed by a conv or linear"
    if len(producer.users) != 1:
        return "its conv or linear has other readers"
    p = bound_args(producer)
    w_node, b_node = p["weight"], p.get("bias")
    weight, mean, var = _constant(gm, w_node), _constant(gm, a["running_mean"]), _constant(gm, a["running_var"])
    if weight is None or mean is None or var is None:
        return "weight or statistics not constant"
    if len(w_node.users) != 1 or (b_node is not None and (_constant(gm, b_node) is None or len(b_node.users) != 1)):
        return "weight or bias read elsewhere, or not constant"
    gamma = _constant(gm, a["weight"]) if a.get("weight") is not None else torch.ones_like(var)
    beta = _constant(gm, a["bias"]) if a.get("bias") is not None else torch.zeros_like(var)
    if gamma is None or beta is None:
        return "affine parameters not constant"
    return dict(producer=producer, w_node=w_node, b_node=b_node, weight=weight, mean=mean, var=var, gamma=gamma,
                beta=beta, eps=a["eps"])  # fmt: skip


def _fold(out: torch.fx.Node, m: Match) -> None:
    gm, producer, w_node, b_node, weight = (out.graph.owning_module, m["producer"], m["w_node"], m["b_node"],
                                            m["weight"])  # fmt: skip
    f64 = torch.float64
    scale = m["gamma"].detach().to(f64) / torch.sqrt(m["var"].detach().to(f64) + m["eps"])
    bias = _constant(gm, b_node).detach().to(f64) if b_node is not None else torch.zeros_like(scale)
    new_w = weight.detach().to(f64) * scale.view(-1, *([1] * (weight.dim() - 1)))
    new_b = (bias - m["mean"].detach().to(f64)) * scale + m["beta"].detach().to(f64)
    _replace_param(gm, w_node.target, new_w.to(weight.dtype))
    if b_node is not None:
        _replace_param(gm, b_node.target, new_b.to(weight.dtype))
    else:
        target = _new_param(gm, w_node.target.rpartition(".")[0], "bias", new_b.to(weight.dtype))
        with gm.graph.inserting_before(producer):
            b_node = gm.graph.get_attr(target)
        record(b_node)
        args = list(producer.args) + [None] * (3 - len(producer.args))
        args[2] = b_node
        producer.args = tuple(args)
    out.replace_all_uses_with(producer)
    gm.graph.erase_node(out)  # and the functional batch norm with it, as dead code


FOLD = RewriteRule("folded", _match, _fold, "batch_norm(conv or linear) -> conv or linear, weights folded")


class FoldBatchNorm(Pass):
    """Fold eval-mode batch_norm into the preceding conv or linear's weight and bias."""

    rewrites_graph = True  # the ending re-types the new bias attributes

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        reasons: dict = {}
        folded = apply([n for n in gm.graph.nodes if n.op == "call_function"], [FOLD], reasons)["folded"]
        if folded:
            gm.graph.eliminate_dead_code()
        return PassResult(modified=folded > 0, stats={"folded": folded}, reasons=reasons)


def _batch_norm(node: torch.fx.Node) -> torch.fx.Node | None:
    """The inference batch norm whose output ``node`` is: itself, or the one it is item 0 of."""
    if node.op != "call_function":
        return None
    if op_name(node) == "batch_norm":
        return node
    source = node.args[0] if node.target is operator.getitem and node.args[1] == 0 else None
    if isinstance(source, torch.fx.Node) and op_name(source) == "_native_batch_norm_legit_no_training":
        return source
    return None


def _replace_param(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    owner_path, _, name = target.rpartition(".")
    gm.get_submodule(owner_path).register_parameter(name, torch.nn.Parameter(value, requires_grad=False))


def _new_param(gm: torch.nn.Module, owner_path: str, name: str, value: torch.Tensor) -> str:
    owner = gm.get_submodule(owner_path)
    while hasattr(owner, name):
        name += "_folded"
    owner.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    return f"{owner_path}.{name}" if owner_path else name
