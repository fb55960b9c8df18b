"""The text form of the IR: one node per line, as written to the per-pass dump files.

    %linear = linear(%x, %w, %b)      : f16[s0,32]  range=[-6.31, 5.88]  @ encoder.fc1
    %softmax = softmax(%linear, -1)   : f32[s0,32]  range=[0.004, 0.97]  @ head  # fp32: ...

Types show the planned dtype and the shape (symbolic dims renamed s0, s1, ... in order of first
appearance, so dumps do not depend on torch's symbol numbering).
"""

from __future__ import annotations

import re

import torch
import torch.fx

from mpcompiler import dtypes
from mpcompiler.ir import KEPT_HIGH, META_KEY, OpClass, Rule, op_name

_SYMBOL = re.compile(r"\b[su]\d+\b")


class _Symbols:
    """Renames torch's shape symbols (s77, s53, ...) to s0, s1, ... in order of first use."""

    def __init__(self):
        self.names: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        return _SYMBOL.sub(lambda m: self.names.setdefault(m.group(0), f"s{len(self.names)}"), text)


def _fmt_arg(a) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, torch.dtype):
        return dtypes.short(a)
    if isinstance(a, torch.device):
        return str(a)
    if isinstance(a, float):
        return f"{a:.6g}"
    return repr(a) if isinstance(a, str) else str(a)


def _fmt_type(val, dtype: torch.dtype | None, syms: _Symbols) -> str:
    if isinstance(val, torch.Tensor):
        d = dtype if dtype is not None and val.dtype.is_floating_point else val.dtype
        return syms(f"{dtypes.short(d)}[{','.join(str(s) for s in val.shape)}]")
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(_fmt_type(v, dtype, syms) for v in val) + ")"
    if isinstance(val, (torch.SymInt, int)):
        return syms(f"int({val})") if isinstance(val, torch.SymInt) else "int"
    return "-"


def _fmt_range(r) -> str:
    text = f"range=[{r.min:.3g}, {r.max:.3g}]"
    if r.nan or r.inf:
        text += f" nan={r.nan} inf={r.inf}"
    return text


def format_node(node: torch.fx.Node, syms: _Symbols) -> tuple[str, str]:
    """(statement, annotations) of one node."""
    rec = node.meta.get(META_KEY)
    if node.op == "placeholder":
        stmt = f"%{node.name} = input"
    elif node.op == "get_attr":
        stmt = f"%{node.name} = param {node.target}"
    elif node.op == "output":
        return f"return {_fmt_arg(node.args[0])}", ""
    else:
        cast = rec is not None and rec.rule is Rule.CAST
        name = "cast" if cast else op_name(node)
        args = ", ".join(_fmt_arg(a) for a in node.args)
        if cast:
            kwargs = f" {{to={dtypes.short(rec.dtype)}}}"
        else:
            kwargs = ", ".join(f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items())
            kwargs = f" {{{kwargs}}}" if kwargs else ""
        stmt = f"%{node.name} = {name}({args}){kwargs}"
    notes = [_fmt_type(node.meta.get("val"), rec.dtype if rec else None, syms)]
    if rec is not None:
        if rec.range is not None:
            notes.append(_fmt_range(rec.range))
        if rec.inner is not None:
            notes.append(f"inside={rec.inner.absmax:.3g} ({rec.inner.what})")
        if rec.module_path:
            notes.append(f"@ {rec.module_path}")
        if rec.fused:
            notes.append(f"# fused: {rec.fused}")
        if rec.op_class is OpClass.FP32 or rec.rule in KEPT_HIGH:
            notes.append(f"# {dtypes.short(rec.math_dtype or rec.dtype)}: {rec.reason}")
        if rec.fp8_reason:  # compile(dtype="fp8"): a linear's level below its dtype, or why not
            notes.append(f"# {rec.fp8_reason}")
    return stmt, "  ".join(notes)


def format_graph(gm: torch.fx.GraphModule, title: str = "") -> str:
    """The whole graph, one node per line, columns aligned."""
    syms = _Symbols()
    rows = [format_node(n, syms) for n in gm.graph.nodes]
    width = min(max((len(s) for s, _ in rows), default=0), 72)
    lines = [f"// {title}"] if title else []
    lines += [f"{s:<{width}}  : {a}".rstrip(" :") if a else s for s, a in rows]
    return "\n".join(lines) + "\n"
