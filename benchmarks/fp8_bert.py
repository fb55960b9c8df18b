"""BERT-base b32 s128 through ``compiled.cuda_graph()``: mpcompiler's fp16 plan against ``dtype="fp8"`` (every
linear an e4m3 GEMM), their median times and rel. L2 errors against fp32, one process. The short form of
benchmarks/gpu.py's fp8 rows (which build every peer first), for a lease with a few minutes left.

    python -m benchmarks.fp8_bert      (writes $OUT/fp8_bert.json, or ./fp8_bert.json)
"""

import json
import os
import time

import torch
import transformers

import mpcompiler
from benchmarks.gpu import median_ms_torch


def sample(batch: int) -> dict:
    ids = torch.randint(0, 30522, (batch, 128), device="cuda")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main():
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig()).eval().cuda()  # random init, BERT-base's shapes
    calib, x = [sample(8) for _ in range(4)], sample(32)
    with torch.no_grad():
        ref = model(**x).last_hidden_state.float()
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    for dtype in ("float16", "fp8"):
        start = time.time()
        compiled = mpcompiler.compile(model, calib, val_data=[sample(8)], dtype=dtype, device="cuda")
        fast = compiled.cuda_graph(x)
        with torch.no_grad():
            err = float((fast(**x).last_hidden_state.float() - ref).norm() / ref.norm())
        out[dtype] = {"ms": round(median_ms_torch(lambda f=fast: f(**x)), 4), "rel_l2": err,
                      "build_s": round(time.time() - start, 1)}  # fmt: skip
        print(json.dumps({dtype: out[dtype]}), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "fp8_bert.json"), "w") as f:
        f.write(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
