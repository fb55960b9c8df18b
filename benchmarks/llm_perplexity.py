"""SmolLM2-135M's perplexity on a text long enough to tell 0.1%: fp32, ``.to(float16)``, ``.to(bfloat16)`` and
mpcompiler's compiled model (as examples/compile_llm.py compiles it, and with the rules alone), and compiled
with ``dtype="fp8"`` (issue #13: e4m3 GEMMs; with a tolerance, the search judges plans by perplexity).

    python -m benchmarks.llm_perplexity   (the CPU; ~7 min)

examples/compile_llm.py judges on 3 held-out paragraphs, ~100 tokens: a plan's perplexity moves there by
tenths of a percent with any change of rounding. Here: 2 x 1,024 tokens of scikit-learn's dataset
descriptions (English prose and tables, shipped with it; never calibrated on), in windows of 256, and the
example's own paragraphs beside them. Prints each model's perplexity on the three texts and its change over
fp32's.
"""

from __future__ import annotations

from pathlib import Path

import sklearn
import torch

import mpcompiler
from examples import compile_llm


def prose_windows(tokenizer, windows: int, length: int = 256) -> list[dict]:
    """``windows`` batches of ``length`` tokens of scikit-learn's dataset descriptions, in order."""
    folder = Path(sklearn.__file__).parent / "datasets" / "descr"
    ids = tokenizer("\n\n".join(f.read_text() for f in sorted(folder.glob("*.rst"))), return_tensors="pt")
    ids = ids["input_ids"][0]
    ones = torch.ones(1, length, dtype=torch.long)
    return [{"input_ids": ids[i * length : (i + 1) * length][None], "attention_mask": ones} for i in range(windows)]


def main():
    tokenizer, model = compile_llm.load("cpu")
    prose = prose_windows(tokenizer, 8)
    texts = {"prose 1-1,024": prose[:4], "prose 1,025-2,048": prose[4:],
             "the example's held-out paragraphs": [dict(tokenizer([t], return_tensors="pt"))
                                                   for t in compile_llm.HELD_OUT]}  # fmt: skip
    calib = [dict(tokenizer([t], return_tensors="pt")) for t in compile_llm.CALIBRATION]

    def ppl(m):
        return [compile_llm.perplexity(m, text) for text in texts.values()]

    rows = {"fp32": ppl(model)}
    for name, dtype in (("float16 (.to)", torch.float16), ("bfloat16 (.to)", torch.bfloat16)):
        rows[name] = ppl(model.to(dtype))  # transformers refuses .half() on GGUF models
        model.to(torch.float32)
    example = dict(val_data=texts["the example's held-out paragraphs"], max_seq=512, max_batch=1)
    rows["compiled, tolerance as the example's"] = ppl(
        mpcompiler.compile(model, calib, tolerance=compile_llm.TOLERANCE, **example)
    )
    rows["compiled, the rules alone"] = ppl(mpcompiler.compile(model, calib, max_seq=512, max_batch=1))

    # issue #13: dtype="fp8", the rules alone and with the search judging plans by perplexity (compile's metric
    # with max_seq) on the first 512 tokens of the prose: the "prose 1-1,024" column includes what it judged on
    rows["compiled, dtype='fp8', the rules alone"] = ppl(mpcompiler.compile(model, calib, dtype="fp8", **example))
    judged = dict(example, val_data=texts["prose 1-1,024"])
    for tolerance in (1e-2, 5e-3):
        compiled = mpcompiler.compile(model, calib, dtype="fp8", tolerance=tolerance, **judged)
        print(f"dtype='fp8', tolerance {tolerance:g}:", *str(compiled.report).splitlines()[1:5], sep="\n")
        rows[f"compiled, dtype='fp8', perplexity tolerance {tolerance:g}"] = ppl(compiled)
    print(f"| model | {' | '.join(texts)} |\n| --- |{' ---: |' * len(texts)}")
    for name, values in rows.items():
        cells = [f"{v:.4f} ({(v / f - 1) * 100:+.3f}%)" for v, f in zip(values, rows["fp32"], strict=True)]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
