"""LLM generation on the GPU: mpcompiler's generate() against Hugging Face's and a gpt-fast-style loop.

    python benchmarks/llm.py --out DIR [--batches 1,8] [--prompt 128] [--new 128] [--deadline 420]

Workload: a Llama with TinyLlama-1.1B's shapes (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632,
vocab 32000), random init, fp16; a 128-token prompt (random ids), 128 new tokens, greedy; batch 1 and 8.
Rows, in this order (a row that fails is recorded and the next runs; past --deadline seconds the rest
are skipped): mpcompiler (compile on the GPU with max_seq and max_batch, then generate: eager prefill,
each decode step one CUDA graph replay); HF generate fp16 eager (dynamic cache); HF generate with
cache_implementation="static" (HF compiles the decode step); a gpt-fast-style loop (HF Llama with a
StaticCache, eager prefill, each decode step under torch.compile(mode="reduce-overhead",
fullgraph=True)); the bandwidth floor (fp16 weight bytes over the device-to-device copy bandwidth
measured here). Timing: wall time of a whole generation (prefill included) after one warm-up
generation, CUDA synchronized, median of 3 (1 for HF eager); tokens/s = batch x new tokens / time.
Writes DIR/llm.json and DIR/llm.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

import mpcompiler

SHAPES = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
CALIB_PROMPTS = 5  # compile() holds one back


def timed(fn, runs: int) -> float:
    fn()  # warm-up: compilation, CUDA graph capture
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting reads and writes."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), 10)
    return 2 * x.numel() / seconds


def gpt_fast_loop(model, ids, new: int, max_seq: int):
    """Static cache, eager prefill, each decode step one torch.compile(mode="reduce-overhead") call."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=max_seq)
    batch, length = ids.shape

    def step(token, position):
        out = model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)
        return out.logits[:, -1]

    decode = torch.compile(step, mode="reduce-overhead", fullgraph=True)

    def run():
        cache.reset()
        logits = step(ids, torch.arange(length, device=ids.device))
        token = logits.argmax(-1, keepdim=True)
        for i in range(new - 1):
            logits = decode(token, torch.tensor([length + i], device=ids.device)).clone()
            token = logits.argmax(-1, keepdim=True)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--deadline", type=float, default=420.0)
    args = parser.parse_args()
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    max_seq = args.prompt + args.new
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPES)
    fp32 = transformers.LlamaForCausalLM(config).eval().cuda()
    half = transformers.LlamaForCausalLM(config).eval().cuda()
    half.load_state_dict(fp32.state_dict())
    half = half.half()
    weight_bytes = sum(p.numel() * 2 for p in half.parameters())
    bandwidth = copy_bandwidth()
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "python benchmarks/llm.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "weights_gb": round(weight_bytes / 1e9, 3),
        "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
    }
    rows = []

    def row(name, batch, build, runs=3):
        if time.time() - start > args.deadline:
            rows.append({"row": name, "batch": batch, "skipped": "past the deadline"})
        else:
            try:
                t0 = time.time()
                fn = build()
                seconds = timed(fn, runs)
                rows.append({"row": name, "batch": batch, "seconds": round(seconds, 4),
                             "tokens_per_s": round(batch * args.new / seconds, 1),
                             "build_s": round(time.time() - t0, 1)})  # fmt: skip
            except Exception as exc:  # one failing row must not lose the others
                rows.append({"row": name, "batch": batch, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "llm.json").write_text(json.dumps(meta | {"rows": rows}, indent=1))

    prompts = {b: torch.randint(3, SHAPES["vocab_size"], (b, args.prompt), device="cuda") for b in batches}
    calib = [torch.randint(3, SHAPES["vocab_size"], (2, 32 + 8 * i), device="cuda") for i in range(CALIB_PROMPTS)]
    compiled = {}

    def ours(batch):
        def build():
            if "c" not in compiled:
                t0 = time.time()
                compiled["c"] = mpcompiler.compile(fp32, calib, max_seq=max_seq, max_batch=max(batches))
                meta["mpcompiler_compile_s"] = round(time.time() - t0, 1)
            c = compiled["c"]
            return lambda: c.generate(prompts[batch], max_new_tokens=args.new)

        return build

    with torch.no_grad():
        for b in batches:
            row("mpcompiler generate (CUDA graph decode)", b, ours(b))
        for b in batches:
            row("gpt-fast-style loop (static cache, reduce-overhead)", b,
                lambda b=b: gpt_fast_loop(half, prompts[b], args.new, max_seq))  # fmt: skip
        for b in batches:
            row("HF generate, static cache", b, lambda b=b: lambda: half.generate(
                prompts[b], max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                cache_implementation="static", pad_token_id=0))  # fmt: skip
        for b in batches:
            row("HF generate, eager", b, lambda b=b: lambda: half.generate(
                prompts[b], max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0),
                runs=1)  # fmt: skip
    floor = bandwidth / weight_bytes  # decode steps per second if each reads every weight once
    for b in batches:
        rows.append({"row": "bandwidth floor (weights / copy bandwidth)", "batch": b,
                     "tokens_per_s": round(b * floor, 1)})  # fmt: skip
    (args.out / "llm.json").write_text(json.dumps(meta | {"rows": rows}, indent=1))
    lines = [f"# LLM generation, {meta['device']}, {meta['date']}", "", f"`{meta['command']}`; torch "
             f"{meta['torch']}, transformers {meta['transformers']}; weights {meta['weights_gb']} GB fp16, copy "
             f"bandwidth {meta['copy_bandwidth_tb_s']} TB/s", "", "| row | batch | tokens/s | s per generation |",
             "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        value = r.get("tokens_per_s", r.get("error", r.get("skipped", "")))
        lines.append(f"| {r['row']} | {r['batch']} | {value} | {r.get('seconds', '')} |")
    (args.out / "llm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
