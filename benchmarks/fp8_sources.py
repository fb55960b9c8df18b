"""Where SmolLM2-135M's fp8 perplexity goes (issue #13): e4m3 weights or e4m3 activations, and which scalings
would win it back. The CPU; ~3 min.

    python -m benchmarks.fp8_sources

Not mpcompiler's plan: the fp32 model with each linear's weight and/or input rounded to e4m3 in place
(``x -> e4m3(x / s) * s``), every linear at once (the LM head included) or one kind of linear alone.
Weights: one scale per tensor, one per group of linears of one input (q, k, v; gate, up: mpcompiler's since
it joins them into one GEMM), or one per output channel. Inputs: the calibrated per-tensor
absmax (mpcompiler's, examples/compile_llm.py's calibration text) or each token's own absmax (dynamic,
what row-wise ``_scaled_mm`` would take). Prints the perplexity over fp32's on benchmarks/llm_perplexity.py's
prose, 1,025-2,048 (never calibrated on) and 1-1,024.
"""

from __future__ import annotations

import torch

from benchmarks.llm_perplexity import prose_windows
from examples import compile_llm

E4M3, MAX = torch.float8_e4m3fn, 448.0
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def rounded(x: torch.Tensor, scale) -> torch.Tensor:
    return ((x.float() / scale).clamp(-MAX, MAX).to(E4M3).float() * scale).to(x.dtype)


def per_token(module, args):
    """A linear's input rounded to e4m3 with each token's own scale (a forward pre-hook)."""
    x = args[0]
    return (rounded(x, x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / MAX),)


def main():
    tokenizer, model = compile_llm.load("cpu")
    prose = prose_windows(tokenizer, 8)
    texts = [prose[4:], prose[:4]]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    absmax = dict.fromkeys(linears, 0.0)

    def seen(name):
        return lambda module, args: absmax.__setitem__(name, max(absmax[name], float(args[0].abs().max())))

    hooks = [m.register_forward_pre_hook(seen(n)) for n, m in linears.items()]
    with torch.no_grad():
        for text in compile_llm.CALIBRATION:
            model(**tokenizer([text], return_tensors="pt"), use_cache=False)
    for hook in hooks:
        hook.remove()
    weights = {n: m.weight.detach().clone() for n, m in linears.items()}
    joined = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}

    def group(name: str) -> str:  # the linears of one input: one GEMM in an fp8 plan
        parent, _, kind = name.rpartition(".")
        return f"{parent}.{joined.get(kind, kind)}"

    group_absmax: dict[str, float] = {}
    for name, w in weights.items():
        group_absmax[group(name)] = max(group_absmax.get(group(name), 0.0), float(w.abs().max()))

    def perplexities(weight: str, inputs: str, kinds=KINDS) -> list[float]:
        hooks = []
        for name, module in linears.items():
            if not any(name.endswith(k) for k in kinds):
                continue
            w = weights[name]
            if weight == "per tensor":
                module.weight.data = rounded(w, w.abs().max() / MAX)
            elif weight == "per input group":
                module.weight.data = rounded(w, group_absmax[group(name)] / MAX)
            elif weight == "per channel":
                module.weight.data = rounded(w, w.abs().amax(1, keepdim=True).clamp_min(1e-12) / MAX)
            if inputs == "calibrated":
                scale = absmax[name] / MAX
                hooks.append(module.register_forward_pre_hook(lambda m, a, s=scale: (rounded(a[0], s),)))
            elif inputs == "per token":
                hooks.append(module.register_forward_pre_hook(per_token))
        try:
            return [compile_llm.perplexity(model, text) for text in texts]
        finally:
            for hook in hooks:
                hook.remove()
            for name, module in linears.items():
                module.weight.data = weights[name].clone()

    fp32 = perplexities("fp32", "fp32")
    print("| weights | inputs | linears | prose 1,025-2,048 | prose 1-1,024 |\n| --- | --- | --- | ---: | ---: |")

    def line(weight, inputs, kinds=KINDS, label="all"):
        cells = [f"{(p / f - 1) * 100:+.2f}%" for p, f in zip(perplexities(weight, inputs, kinds), fp32, strict=True)]
        print(f"| {weight} | {inputs} | {label} | {' | '.join(cells)} |", flush=True)

    for weight, inputs in [("per tensor", "fp32"), ("per input group", "fp32"), ("per channel", "fp32"),
                           ("fp32", "calibrated"), ("fp32", "per token"), ("per tensor", "calibrated"),
                           ("per input group", "calibrated"), ("per channel", "calibrated"),
                           ("per channel", "per token")]:  # fmt: skip
        line(weight, inputs)
    for kind in KINDS:
        line("per tensor", "calibrated", [kind], f"{kind} alone")
    rest = [k for k in KINDS if k != "lm_head"]
    for weight, inputs in [("per tensor", "calibrated"), ("per channel", "calibrated"), ("per channel", "per token")]:
        line(weight, inputs, rest, "all but lm_head")


if __name__ == "__main__":
    main()
