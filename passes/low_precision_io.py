"""low_precision_io: float inputs and outputs in the low dtype, for ``export_onnx(io_dtype="float16")``.

The compiled graph keeps the model's signature: fp32 in and out, cast to and from fp16 at its edges. A
caller whose tensors are fp16 already (a GPU pipeline, another fp16 model) would pay a cast each way
and twice the bytes at the boundary. This pass, on the ONNX lowering's copy of the graph, makes each
float input ``dtype``, read through a cast back to its old dtype, and casts each float output to
``dtype``; eliminate_casts, run next, folds the pairs this makes (f16 -> f32 -> f16 is exact), so the
edges' casts go away instead of doubling.

A plain walk over the inputs and the outputs, not rewrite rules: there is no pattern to match.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from mpcompiler.ir import META_KEY, NodeRecord, Rule
from mpcompiler.pass_manager import Pass, PassResult

CAST = torch.ops.aten._to_copy.default


class LowPrecisionIo(Pass):
    """Make the graph's float inputs and outputs ``dtype``."""

    rewrites_graph = True

    def __init__(self, *, dtype: torch.dtype):
        self.dtype = dtype

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        inputs = 0
        for p in placeholders:
            val = p.meta.get("val")
            if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
                continue
            with graph.inserting_after(placeholders[-1]):  # FX keeps the inputs first
                back = graph.call_function(CAST, (p,), {"dtype": val.dtype})
            p.replace_all_uses_with(back, delete_user_cb=lambda u, back=back: u is not back)
            p.meta["val"] = val.to(self.dtype)
            p.meta[META_KEY] = dataclasses.replace(p.meta[META_KEY], dtype=self.dtype)  # eliminate_casts reads it
            back.meta[META_KEY] = NodeRecord(dtype=val.dtype, rule=Rule.CAST, inserted=True)
            inputs += 1
        output = graph.output_node()
        outs, outputs = [], 0
        with graph.inserting_before(output):
            for o in output.args[0]:
                val = o.meta.get("val") if isinstance(o, torch.fx.Node) else None
                if isinstance(val, torch.Tensor) and val.dtype.is_floating_point and val.dtype != self.dtype:
                    o = graph.call_function(CAST, (o,), {"dtype": self.dtype})  # one per output, a repeated one too
                    o.meta[META_KEY] = NodeRecord(dtype=self.dtype, rule=Rule.CAST, inserted=True)
                    outputs += 1
                outs.append(o)
        if outputs:
            output.args = (tuple(outs),)
        return PassResult(modified=bool(inputs or outputs), stats={"inputs_cast": inputs, "outputs_cast": outputs})
