"""GPU coverage sweep (issue 10): does every model compile, and stay within 5e-3 of fp32 in FX and in ONNX Runtime?

    python benchmarks/sweep.py --out DIR --device cuda --jobs 6 --timeout 240 --deadline 540
    python benchmarks/sweep.py --out DIR2 --skip DIR/sweep.jsonl ...       (a second run: only what is missing)
    python benchmarks/sweep.py --report DIR/sweep.jsonl DIR2/sweep.jsonl    (one table from both runs)
    python benchmarks/sweep.py --out DIR --device cpu --jobs 2 --models resnet18,hf_bert   (a CPU dry run)

Models: every torchvision classification model (weights=None, batch 1, 224x224; inception_v3 299x299) and
small random-init HF models (``hf_bert``, ``hf_llama``, ...: 2 layers, hidden 64-128, vocab 1000; text at
batch 2, seq 16, with a padded second row in some samples). All-zero float parameters (torchvision's ViT
head, for one) are re-initialized with N(0, 0.02) first, so that no error is 0/0; the row says which.

Each model runs in a worker process of its own (``--worker NAME``), ``--jobs`` at a time, so that a
crash, hang or OOM costs one row, not the sweep. A worker measures, on the sample compile() holds out
and on one fresh sample, the relative L2 error vs fp32 (TF32 off; worst output, worst sample) of:
``model.half()`` eager, ``torch.autocast`` fp16 eager, mpcompiler's FX module (``compile(model, calib,
device=...)``, default options) and its ONNX artifact in ONNX Runtime (``export_onnx(verify="warn")``: the
CUDA provider with ``--device cuda``, the CPU provider with ``--device cpu``). A failing stage is recorded
as ``"Type: message"`` and the next stage still runs.

Writes DIR/sweep.jsonl (one row per model, appended and flushed as each finishes, so that a killed run
keeps what it finished), DIR/sweep.md (the table and summary, rewritten after every row) and, at the
end, DIR/logs.tar.gz (each worker's stderr). docs/coverage.md describes the method.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import faulthandler
import importlib.metadata
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE, TOL = 5e-3, "5e-3"  # rel. L2 vs fp32, for FX and ONNX alike: export_onnx's own default
SEED = 0
CALIB = 5  # compile() holds back a fifth: 4 calibration samples, 1 held out
TEXT_BATCH, TEXT_SEQ, VOCAB = 2, 16, 1000
STDERR_TAIL = 12  # lines of a crashed worker's stderr kept in its row
STACK_FRAMES = 8  # innermost frames kept from faulthandler's report of a crashed or hung worker

# Small random-init HF models: name -> (input kind, builder given the transformers module).
HF_MODELS = {
    "hf_bert": ("text", lambda tf: tf.BertModel(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64))),
    "hf_roberta": ("text", lambda tf: tf.RobertaModel(tf.RobertaConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64))),
    "hf_distilbert": ("text", lambda tf: tf.DistilBertModel(tf.DistilBertConfig(
        vocab_size=VOCAB, dim=128, n_layers=2, n_heads=4, hidden_dim=256, max_position_embeddings=64))),
    "hf_albert": ("text", lambda tf: tf.AlbertModel(tf.AlbertConfig(
        vocab_size=VOCAB, embedding_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64))),
    "hf_electra": ("text", lambda tf: tf.ElectraModel(tf.ElectraConfig(
        vocab_size=VOCAB, embedding_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64))),
    "hf_gpt2": ("text", lambda tf: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
        use_cache=False))),
    "hf_opt": ("text", lambda tf: tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=128, word_embed_proj_dim=128, num_hidden_layers=2, num_attention_heads=4,
        ffn_dim=256, max_position_embeddings=64, use_cache=False))),
    "hf_llama": ("text", lambda tf: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False))),  # GQA: 2 KV heads for 4
    "hf_mistral": ("text", lambda tf: tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=12, use_cache=False))),
    # window 12 of 16 tokens: with 8 right-padded (the fresh sample) a window of 8 leaves the last query no key,
    # a row every attention kernel fills differently (fp32 eager against sdpa: 0.86 apart on the CPU)
    "hf_gemma": ("text", lambda tf: tf.GemmaForCausalLM(tf.GemmaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=64, use_cache=False))),
    "hf_phi3": ("text", lambda tf: tf.Phi3ForCausalLM(tf.Phi3Config(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=0, use_cache=False))),  # q/k/v and gate/up as one linear each
    "hf_deberta_v2": ("text", lambda tf: tf.DebertaV2Model(tf.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64, relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"]))),
    "hf_t5_encoder": ("text", lambda tf: tf.T5EncoderModel(tf.T5Config(
        vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4))),
    "hf_vit": ("pixel_values", lambda tf: tf.ViTModel(tf.ViTConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=64,
        patch_size=8))),
    "hf_swin": ("pixel_values", lambda tf: tf.SwinModel(tf.SwinConfig(
        image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4))),
    "hf_whisper_encoder": ("input_features", lambda tf: whisper_encoder(tf.WhisperConfig(
        d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=80,
        max_source_positions=64))),
}  # fmt: skip


def whisper_encoder(config):
    """The encoder alone (no decoder to build, whose token ids would have to fit a small vocabulary)."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return WhisperEncoder(config)


HF_COST = 50e6  # ordering: an HF model counts as a 50M-parameter CNN (small, but many ops to capture and export)
IMAGE_SIZE = {"inception_v3": 299}
TORCHVISION_KWARGS = {  # without aux heads: they are training-only outputs, and init_weights=False is quicker
    "inception_v3": {"aux_logits": False, "init_weights": False},
    "googlenet": {"aux_logits": False, "init_weights": False},
}


# --- models and samples ---------------------------------------------------------------------------------------------


def torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def ordered(names: list[str]) -> list[str]:
    """Biggest first: they take longest and should run beside the small ones, not after them. The size is
    the weights' metadata (num_params), which torchvision has without building or downloading anything."""
    import torchvision

    def cost(name: str) -> float:
        if name in HF_MODELS:
            return HF_COST
        try:
            return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
        except Exception:  # an unknown name: its worker reports it
            return 0.0

    return sorted(names, key=lambda n: (-cost(n), n))


def family(name: str) -> str:
    return "hf" if name in HF_MODELS else "torchvision"


def build(name: str, device):
    """(model in eval mode on ``device``, CALIB calibration samples, one fresh sample, input description).
    Samples are on the CPU: a tensor (images) or a dict of keyword arguments (HF)."""
    import torch

    kind = HF_MODELS[name][0] if name in HF_MODELS else "image"
    try:  # on the device: initializing vit_h_14's or regnet_y_128gf's 640M parameters on the CPU takes long
        model = construct(name, device)
    except Exception as exc:  # a constructor that cannot build under a device context: on the CPU, then moved
        if device == "cpu":
            raise
        print(f"building on {device} failed ({short(exc)}); building on the CPU", file=sys.stderr, flush=True)
        model = construct(name, "cpu")
    model.to(device).eval()  # also catches a constructor that put a tensor on the CPU explicitly
    gen = torch.Generator().manual_seed(SEED)
    samples = [sample(kind, i, model, gen, IMAGE_SIZE.get(name, 224)) for i in range(CALIB + 1)]
    return model, samples[:CALIB], samples[CALIB], describe(samples[0])


def construct(name: str, device):
    import torch

    torch.manual_seed(SEED)
    with torch.device(device):
        if name in HF_MODELS:
            import transformers

            return HF_MODELS[name][1](transformers)
        import torchvision

        return torchvision.models.get_model(name, weights=None, **TORCHVISION_KWARGS.get(name, {}))


def sample(kind: str, index: int, model, gen, image_size: int):
    import torch

    if kind == "image":
        return torch.randn(1, 3, image_size, image_size, generator=gen)
    if kind == "pixel_values":
        size = model.config.image_size
        return {"pixel_values": torch.randn(1, model.config.num_channels, size, size, generator=gen)}
    if kind == "input_features":
        length = 2 * model.config.max_source_positions  # Whisper's encoder takes exactly this many frames
        return {"input_features": torch.randn(1, model.config.num_mel_bins, length, generator=gen)}
    ids = torch.randint(3, VOCAB, (TEXT_BATCH, TEXT_SEQ), generator=gen)  # 0-2: pad/special ids of some configs
    mask = torch.ones(TEXT_BATCH, TEXT_SEQ, dtype=torch.long)
    if index % 2 == 0 or index >= CALIB:  # padded: calibration samples 0 and 2, the held-out (4) and fresh (5)
        mask[1, TEXT_SEQ - 3 - index :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def describe(s) -> str:
    import torch

    if isinstance(s, torch.Tensor):
        return "x".join(map(str, s.shape))
    return ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in s.items())


def reinit_zero_params(model) -> list[str]:
    """Give every all-zero float weight (a parameter of 2 or more dims) N(0, 0.02) values; the names changed.

    A zero-initialized classifier (torchvision's ViT heads) makes every output 0 and every relative error
    0/0. Zero biases and norm shifts are left as the model initializes them: they are how the model is built.
    """
    import torch

    changed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point and p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.02)
                changed.append(name)
    return changed


# --- measuring ------------------------------------------------------------------------------------------------------


def call(fn, s):
    return fn(**s) if isinstance(s, dict) else fn(s)


def to(s, device, dtype=None):
    """A sample on ``device``; float tensors in ``dtype`` if given (for model.half())."""

    def move(t):
        t = t.to(device)
        return t.to(dtype) if dtype is not None and t.dtype.is_floating_point else t

    return {k: move(v) for k, v in s.items()} if isinstance(s, dict) else move(s)


def flat(out) -> list:
    """The output's float tensors, in pytree order (HF ModelOutputs are pytree nodes), as float64 on the CPU."""
    import torch
    import torch.utils._pytree as pytree

    leaves = pytree.tree_leaves(out)
    return [t.detach().double().cpu() for t in leaves if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]


def rel_err(outs: list, refs: list) -> float:
    """The worst output's relative L2 error; NaN if any is not finite (NaN or inf outputs)."""
    if len(outs) != len(refs):
        raise ValueError(f"{len(outs)} float outputs, the fp32 model has {len(refs)}")
    errs = []
    for o, r in zip(outs, refs, strict=True):
        den = float(r.norm())
        if den > 0:
            errs.append(float((o.reshape(r.shape) - r).norm()) / den)
    if any(not math.isfinite(e) for e in errs):
        return math.nan
    return max(errs, default=0.0)


def worst(errs) -> float:
    errs = list(errs)
    return math.nan if any(not math.isfinite(e) for e in errs) else max(errs)


def errors(fn, samples, refs, device, dtype=None) -> float:
    """``fn``'s worst error over the samples."""
    import torch

    with torch.no_grad():
        return worst(rel_err(flat(call(fn, to(s, device, dtype))), r) for s, r in zip(samples, refs, strict=True))


def error_fields(err: float | None) -> dict:
    """JSON has no NaN: a non-finite error is null with "nan": true."""
    if err is None:
        return {"err": None}
    return {"err": err, "nan": False} if math.isfinite(err) else {"err": None, "nan": True}


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip()[:300]}"


# --- the worker: one model, in its own process ----------------------------------------------------------------------


class Worker:
    """Measures one model stage by stage; after each, the row so far goes to ``result`` (atomically), so
    that the driver still has it if a later stage kills the process."""

    def __init__(self, name: str, device: str, result: Path, scratch: Path, abort_at: str | None):
        self.name, self.device, self.result, self.scratch, self.abort_at = name, device, result, scratch, abort_at
        self.row = {"model": name, "family": family(name)}

    def save(self):
        tmp = self.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.row))
        tmp.replace(self.result)

    @contextlib.contextmanager
    def stage(self, key: str):
        """Run a stage: its seconds and, if it raises, its error go in row[key]; the next stage still runs."""
        self.row["stage"] = key
        self.save()
        print(f"[sweep] {self.name}: {key}", file=sys.stderr, flush=True)  # where a crash's log lines belong
        if self.abort_at == f"{self.name}:{key}":  # --abort-at: test that the driver survives a worker dying here
            os.abort()
        entry = self.row.setdefault(key, {})
        start = time.perf_counter()
        try:
            yield entry
        except Exception as exc:
            entry["error"] = short(exc)
            print(f"{key} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        finally:
            entry["s"] = round(time.perf_counter() - start, 2)
            self.save()

    def run(self):
        import torch

        self.row["device_name"] = torch.cuda.get_device_name() if self.device == "cuda" else "CPU"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the reference is fp32
        model = None
        with self.stage("build") as entry:
            model, calib, fresh, entry["input"] = build(self.name, self.device)
            changed = reinit_zero_params(model)  # before anything else sees the model
            self.row["zero_weights_reinit"] = changed
            self.row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        if model is None:
            return self.finish()
        held_out = calib[-1]  # compile() holds back the last fifth of calib_data: with 5 samples, this one
        evaluation = [held_out, fresh]
        with self.stage("fp32") as entry, torch.no_grad():
            refs = [flat(call(model, to(s, self.device))) for s in evaluation]
            entry["outputs"] = len(refs[0])
        if "error" in self.row["fp32"]:
            return self.finish()
        with self.stage("half") as entry:
            half = copy.deepcopy(model).half()
            try:
                entry |= error_fields(errors(half, evaluation, refs, self.device, torch.float16))
            finally:
                del half
                self.free()
        with self.stage("autocast") as entry:

            def autocast(*args, **kwargs):
                with torch.autocast(self.device, dtype=torch.float16):
                    return model(*args, **kwargs)

            entry |= error_fields(errors(autocast, evaluation, refs, self.device))
        compiled = None
        with self.stage("compile"):
            import mpcompiler

            compiled = mpcompiler.compile(model, calib, device=self.device)
        if compiled is None:  # the compile error is the row's verdict; the peers above are measured
            return self.finish()
        with self.stage("fx") as entry:
            report = compiled.report.accuracy  # on the held-out sample
            held = worst(report.per_output.values()) if report is not None and report.per_output else math.nan
            fresh_err = errors(compiled, [fresh], refs[1:], self.device)
            entry["held_out"], entry["fresh"] = error_fields(held)["err"], error_fields(fresh_err)["err"]
            entry |= error_fields(worst([held, fresh_err]))
        with self.stage("onnx") as entry:
            self.onnx(compiled, entry)
        return self.finish()

    def onnx(self, compiled, entry: dict):
        provider = "CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider"
        entry["provider_wanted"] = provider
        try:
            import onnxruntime
        except ImportError as exc:
            entry["skipped"] = f"onnxruntime is not importable ({exc})"
            return
        entry["onnxruntime"] = onnxruntime.__version__
        if provider not in onnxruntime.get_available_providers():
            entry["skipped"] = f"onnxruntime {onnxruntime.__version__} has no {provider} (install onnxruntime-gpu)"
            return
        with tempfile.TemporaryDirectory(dir=self.scratch) as tmp:  # an ONNX of vit_h_14 is 1.3 GB: not kept
            art = compiled.export_onnx(Path(tmp) / f"{self.name}.onnx", verify="warn", providers=[provider])
        entry["provider"] = art.verified_with
        entry["vs_fx"] = error_fields(worst(art.error_vs_fx.values()) if art.error_vs_fx else None)["err"]
        entry |= error_fields(worst(art.error_vs_fp32.values()) if art.error_vs_fp32 else None)
        if art.verified_with != provider:  # ONNX Runtime falls back to the CPU when the CUDA provider fails to load
            entry["error"] = f"verified with {art.verified_with}, not {provider}"

    def free(self):
        import torch

        if self.device == "cuda":
            torch.cuda.empty_cache()

    def finish(self):
        self.row.pop("stage", None)
        self.row["done"] = True
        self.save()


def worker_main(args):
    import torch

    torch.set_num_threads(args.threads)
    # A native crash (in ONNX Runtime, say) prints the Python stack to the log, and the driver's SIGUSR1
    # before it kills a worker for its timeout prints where it hung.
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=False)
    threading.Thread(target=exit_with_driver, args=(os.getppid(),), daemon=True).start()
    scratch = Path(args.scratch or tempfile.gettempdir())
    Worker(args.worker, args.device, Path(args.result), scratch, args.abort_at).run()


def exit_with_driver(driver: int):
    """A worker whose driver is gone (killed by the command's time limit) stops too: it would hold the GPU
    and the CPUs of a machine that the next command may get while it is still warm."""
    while os.getppid() == driver:
        time.sleep(2)
    os._exit(3)


# --- the driver: workers N at a time, rows as they finish ------------------------------------------------------------


class Job:
    def __init__(self, name: str, args, scratch: Path):
        self.name = name
        self.result = scratch / f"{name}.json"
        self.log = scratch / f"{name}.stderr.txt"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--device", args.device,
               "--result", str(self.result), "--scratch", str(scratch), "--threads", str(args.threads)]  # fmt: skip
        if (args.abort_at or "").partition(":")[0] == name:
            cmd += ["--abort-at", args.abort_at]
        threads = str(args.threads)
        env = os.environ | {
            "CUDA_MODULE_LOADING": "LAZY",
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",  # random-init configs: nothing to download, and the GPU machine has no network
            "TOKENIZERS_PARALLELISM": "false",
        }
        with open(self.log, "wb") as log:
            # A session of its own: a timeout kills the worker and anything it started, and nothing else.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def kill(self, dump_stack: bool = False):
        with contextlib.suppress(ProcessLookupError):
            if dump_stack:  # faulthandler writes the worker's stack to its log
                os.kill(self.proc.pid, signal.SIGUSR1)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=2)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def row(self, timed_out: float | None = None) -> dict:
        """The worker's row; for a worker that crashed or timed out, what it had saved plus why it ended."""
        try:
            row = json.loads(self.result.read_text())
        except (OSError, ValueError):
            row = {"model": self.name, "family": family(self.name)}
        row["seconds"] = round(self.elapsed, 1)
        if row.get("done") and self.proc.returncode == 0:
            return row
        rc = self.proc.returncode
        reason = f"signal {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"exit code {rc}"
        row["worker"] = {
            "ended": "timeout" if timed_out else "crash",
            "stage": row.pop("stage", None),
            "why": f"killed after {timed_out:.0f} s" if timed_out else reason,
            **self.log_excerpts(),
        }
        return row

    def log_excerpts(self) -> dict:
        """The log's last lines, and faulthandler's report if there is one: the fatal error and the
        innermost frames of the main thread (where a native crash or a hang happened)."""
        try:
            lines = self.log.read_text(errors="replace").rstrip().splitlines()
        except OSError:
            return {}
        excerpts = {"stderr_tail": "\n".join(line[:300] for line in lines[-STDERR_TAIL:])}
        starts = [i for i, line in enumerate(lines) if line.startswith(("Current thread 0x", "Stack (most recent"))]
        if starts:
            fatal = [line for line in lines if line.startswith("Fatal Python error")][-1:]
            frames = []
            for frame in lines[starts[-1] + 1 :]:
                if not frame.startswith("  File "):
                    break
                # paths from the package or the checkout on: "torch/_ops.py", "mpcompiler/passes/..."
                frames.append(re.sub(r'"/\S*/(site-packages|dist-packages)/', '"', frame).replace(f'"{ROOT}/', '"'))
            # the innermost frames say where it died; the innermost in mpcompiler, which pass it was in
            ours = [f for f in frames[STACK_FRAMES:] if "/mpcompiler/" in f][:3]
            kept = frames[:STACK_FRAMES] + (["  ..."] + ours if ours else [])
            excerpts["stack"] = "\n".join(fatal + [lines[starts[-1]]] + kept)
        return excerpts


def environment(args) -> dict:
    def version(*dists):
        for d in dists:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return f"{d} {importlib.metadata.version(d)}"
        return None

    try:  # the GPU machine's copy of the tree may have no .git
        git = ["git", "-C", str(ROOT), "describe", "--always", "--dirty"]
        commit = subprocess.run(git, capture_output=True, text=True)
    except OSError:
        commit = None
    return {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "benchmarks/sweep.py", *sys.argv[1:]]),
        "commit": (commit.stdout.strip() or None) if commit else None,
        "python": sys.version.split()[0],
        "versions": [v for v in (version("torch"), version("torchvision"), version("transformers"),
                                 version("onnxruntime-gpu", "onnxruntime"), version("mpcompiler")) if v],
    }  # fmt: skip


class Interrupted(Exception):
    pass


def preflight(device: str):
    """Fail in seconds what would otherwise fail in every worker, and say what the ONNX stage will do."""
    try:
        import mpcompiler
        import mpcompiler.passes
    except ImportError as exc:  # mpcompiler.passes lives in passes/: a plain checkout on sys.path is not enough
        sys.exit(f"mpcompiler is not importable ({exc}): pip install --no-deps --no-build-isolation -e . first")
    homes = {Path(m.__file__).resolve().parents[1] for m in (mpcompiler, mpcompiler.passes)}
    if homes != {ROOT}:
        print(f"warning: mpcompiler is imported from {', '.join(map(str, homes))}, not {ROOT}", flush=True)
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch.cuda.is_available() is False")
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    try:
        import onnxruntime

        if provider not in onnxruntime.get_available_providers():
            print(f"warning: onnxruntime {onnxruntime.__version__} has no {provider}: ONNX is skipped", flush=True)
    except ImportError:
        print("warning: onnxruntime is not importable: ONNX is skipped", flush=True)


def driver_main(args):
    preflight(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ordered(args.models.split(",") if args.models else torchvision_models() + list(HF_MODELS))
    previous = load_rows(args.skip or [])
    names = [n for n in names if n not in previous]
    if args.limit is not None:
        names = names[: args.limit]
    env = environment(args)
    scratch = Path(tempfile.mkdtemp(prefix="sweep-", dir=args.scratch))
    jsonl = out / "sweep.jsonl"
    jsonl.touch()  # there even if no model finishes, for a later --skip
    rows = dict(previous)
    print(f"sweep: {len(names)} models ({len(previous)} done before), {args.jobs} at a time, "
          f"timeout {args.timeout} s, device {args.device}; scratch {scratch}", flush=True)  # fmt: skip

    def stop(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + args.deadline if args.deadline else math.inf
    pending, running, finished = deque(names), {}, 0
    try:
        while pending or running:
            if time.monotonic() >= deadline:
                raise Interrupted(f"--deadline {args.deadline} s")
            while pending and len(running) < args.jobs:
                name = pending.popleft()
                running[name] = Job(name, args, scratch)
            for name, job in list(running.items()):
                timed_out = job.elapsed > args.timeout
                if timed_out:
                    job.kill(dump_stack=True)
                elif job.proc.poll() is None:
                    continue
                row = env | job.row(timed_out=args.timeout if timed_out else None)
                judge(row)
                with open(jsonl, "a") as f:  # appended as it comes: a killed run keeps its finished rows
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                rows[name] = row
                del running[name]
                finished += 1
                print(f"[{finished}/{len(names)}] {line(row)}", flush=True)
                (out / "sweep.md").write_text(markdown(rows, env, names))
            time.sleep(0.2)
    except (Interrupted, KeyboardInterrupt) as exc:
        # Unfinished models get no row: a later run with --skip runs them again.
        for job in running.values():
            job.kill()
        unfinished = [*running, *pending]
        print(f"stopped ({type(exc).__name__} {exc}); not finished: {', '.join(unfinished) or 'none'}", flush=True)
    (out / "sweep.md").write_text(markdown(rows, env, names))
    archive_logs(scratch, out / "logs.tar.gz")
    print(summary_text(rows, details=False), flush=True)  # the details are in sweep.md


def archive_logs(scratch: Path, path: Path):
    """The workers' stderr, one archive (the GPU machine returns few files), then the scratch folder goes."""
    with tarfile.open(path, "w:gz") as tar:
        for log in sorted(scratch.glob("*.stderr.txt")):
            tar.add(log, arcname=f"logs/{log.name}")
    shutil.rmtree(scratch, ignore_errors=True)  # with the ONNX folders of workers killed mid-export


# --- verdicts and the report ----------------------------------------------------------------------------------------


def judge(row: dict) -> dict:
    """Set row["pass"] (FX and ONNX errors finite and <= TOLERANCE) and row["verdict"] (why not, in short)."""
    why = []
    worker = row.get("worker")
    if worker:
        why.append(f"{worker['ended']} in {worker['stage'] or 'start-up'} ({worker['why']})")
    for stage in ("build", "fp32", "compile"):
        if "error" in row.get(stage, {}):
            why.append(f"{stage}: {row[stage]['error'].split(':')[0]}")
    if not why:
        for stage, label in (("fx", "FX"), ("onnx", "ONNX")):
            entry = row.get(stage)
            if entry is None:
                why.append(f"{label} not run")
            elif "skipped" in entry:
                why.append(f"{label} skipped")
            elif "error" in entry:
                why.append(f"{label}: {entry['error'].split(':')[0]}")
            elif entry.get("nan"):
                why.append(f"{label} NaN")
            elif entry.get("err") is None or entry["err"] > TOLERANCE:
                why.append(f"{label} {fmt(entry.get('err'))}")
    row["pass"] = not why
    row["verdict"] = "pass" if not why else "FAIL: " + "; ".join(why)
    return row


def peer_fails(entry: dict | None) -> bool | None:
    """A peer fails past TOLERANCE or with NaN; None where it was not measured."""
    if not entry or "error" in entry:
        return None
    return bool(entry.get("nan")) or entry.get("err") is None or entry["err"] > TOLERANCE


def fmt(err) -> str:
    return "-" if err is None else f"{err:.1e}"


def cell(entry: dict | None) -> str:
    if not entry:
        return ""
    if "skipped" in entry:
        return "skipped"
    if "error" in entry and entry.get("err") is None:
        return f"error ({entry['error'].split(':')[0]})"
    return "NaN" if entry.get("nan") else fmt(entry.get("err"))


def line(row: dict) -> str:
    """One short stdout line per model, so that the tail of a long run stays readable."""
    errs = " ".join(f"{k} {cell(row.get(k)).split(' ')[0] or '-'}" for k in ("fx", "onnx", "half", "autocast"))
    return f"{row['model']}: {row['verdict'][:70]} | {errs} | {row.get('seconds', 0):.0f}s"


def load_rows(paths) -> dict[str, dict]:
    """Rows by model from jsonl files; a later file's row wins (a rerun replaces a model's row)."""
    rows = {}
    for path in paths:
        for text in Path(path).read_text().splitlines():
            if text.strip():
                row = json.loads(text)
                rows[row["model"]] = judge(row)  # judged again: the rules live here, not in old files
    return rows


def sort_key(row: dict):
    return (row.get("family") != "torchvision", row["model"])


def fx_only(rows) -> bool:
    """No ONNX artifact could be checked in these rows (onnxruntime without a provider for the device, or not
    importable): the FX module alone is judged. Rows that never reached ONNX (a failed compile) do not decide it."""
    reached = [r["onnx"] for r in rows if r.get("onnx")]
    return bool(reached) and all("skipped" in entry for entry in reached)


def verdict(row: dict, fx_alone: bool) -> str:
    """The row's verdict as the report prints it: a pass of the FX module alone where ONNX could not be checked."""
    return "pass (FX; ONNX not checked)" if fx_alone and row["verdict"] == "FAIL: ONNX skipped" else row["verdict"]


def summary_text(rows: dict[str, dict], details: bool = True) -> str:
    """Counts, the peers' failures and each failing model's verdict; ``details``: with its error message."""
    by_model, rows = rows, sorted(rows.values(), key=sort_key)
    fx_alone = fx_only(rows)

    def ok(row: dict) -> bool:
        return verdict(row, fx_alone).startswith("pass")

    passed = [r for r in rows if ok(r)]
    what = f"the FX module within {TOL} of fp32; ONNX not checked here"
    what = what if fx_alone else f"FX and ONNX within {TOL} of fp32"
    lines = [f"- mpcompiler: **{len(passed)} of {len(rows)} pass** ({what})."]
    for fam in ("torchvision", "hf"):
        of = [r for r in rows if r.get("family") == fam]
        if of:
            lines.append(f"  - {fam}: {sum(ok(r) for r in of)} of {len(of)}")
    for stage, label in (("fx", "the FX module"), ("onnx", "the ONNX artifact")):  # each apart: a run without
        checked = [r[stage] for r in rows if (r.get(stage) or {}).get("err") is not None]  # ORT CUDA checks FX only
        within = [e for e in checked if not e.get("nan") and e["err"] <= TOLERANCE]
        lines.append(f"  - {label}: within {TOL} on {len(within)} of {len(checked)} checked"
                     + (f" ({len(rows) - len(checked)} not checked: skipped or failed)" if len(checked) < len(rows)
                        else ""))  # fmt: skip
    for key, label in (("half", "`model.half()`"), ("autocast", "`torch.autocast` fp16")):
        judged = {r["model"]: peer_fails(r.get(key)) for r in rows}
        compared = [m for m, f in judged.items() if f is not None]
        failed = [m for m, f in judged.items() if f]
        lines.append(f"- {label}: fails (> {TOL} or NaN) on **{len(failed)} of {len(compared)}** compared"
                     + (f": {', '.join(failed)}" if failed else "."))  # fmt: skip
        if key == "half":
            ours = [m for m in failed if ok(by_model[m])]
            lines.append(f"- mpcompiler passes where `model.half()` fails: {len(ours)} ({', '.join(ours) or 'none'}).")
    failing = [r for r in rows if not ok(r)]
    if failing:
        lines.append("- Failing models, and why:")
        lines += [
            f"  - {r['model']}: {r['verdict'].removeprefix('FAIL: ')}{detail(r) if details else ''}" for r in failing
        ]
    zero = [
        f"{r['model']} ({len(w)}: {', '.join(w[:2])}{', ...' if len(w) > 2 else ''})"
        for r in rows
        if (w := r.get("zero_weights_reinit"))
    ]
    lines.append(f"- All-zero weights re-initialized with N(0, 0.02) in {len(zero)} models: {'; '.join(zero) or '-'}")
    return "\n".join(lines)


def detail(row: dict) -> str:
    """The first error message behind a failure, for the summary."""
    for stage in ("build", "fp32", "compile", "fx", "onnx"):
        message = row.get(stage, {}).get("error")
        if message:
            return f" - `{message[:200]}`"
    worker = row.get("worker")
    if worker and worker.get("stack"):  # faulthandler's report: the innermost frame says where
        frames = [f.strip() for f in worker["stack"].splitlines() if f.strip().startswith("File ")]
        text = f" - innermost frame: `{frames[0][:200]}`" if frames else ""
        ours = [f for f in frames[1:] if "/mpcompiler/" in f]
        return text + (f", in mpcompiler: `{ours[0][:200]}`" if ours else "")
    if worker and worker.get("stderr_tail"):
        return f" - last stderr line: `{worker['stderr_tail'].splitlines()[-1][:200]}`"
    return ""


def markdown(rows: dict[str, dict], env: dict | None = None, requested: list[str] | None = None) -> str:
    ordered_rows = sorted(rows.values(), key=sort_key)
    envs = [env] if env else []
    envs += [r for r in ordered_rows if "date" in r]
    devices = sorted({r["device_name"] for r in ordered_rows if r.get("device_name")})
    providers = sorted({r["onnx"]["provider"] for r in ordered_rows if r.get("onnx", {}).get("provider")})
    out = ["# mpcompiler coverage sweep", ""]
    seen = set()
    for e in envs:  # one line per distinct run (two runs merged: two lines)
        key = (e.get("date"), e.get("command"), tuple(e.get("versions", ())))
        if key not in seen:
            seen.add(key)
            out.append(f"- {e.get('date')}, {', '.join(e.get('versions', ()))}, Python {e.get('python')}"
                       f"{', commit ' + e['commit'] if e.get('commit') else ''}: `{e.get('command')}`")  # fmt: skip
    out += [
        f"- Device: {', '.join(devices) or 'unknown'}; ONNX Runtime provider: {', '.join(providers) or 'none'}.",
        f"- Errors: relative L2 vs fp32 (TF32 off), the worst float output on the worst of two samples (the one "
        f"compile() held out and a fresh one); ONNX: `export_onnx`'s verification in ONNX Runtime on the held-out "
        f"sample. Pass: FX and ONNX <= {TOL}.",
        "",
        "## Summary",
        "",
        summary_text(rows) if rows else "No rows yet.",
    ]
    missing = [n for n in requested or () if n not in rows]
    if missing:
        out.append(f"- Not finished (no row; `--skip` runs them again): {', '.join(missing)}.")
    out += [
        "",
        "## Models",
        "",
        "| model | params (M) | compile s | FX err | ONNX err | .half() err | autocast err | verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    fx_alone = fx_only(ordered_rows)
    for r in ordered_rows:
        compile_s = r.get("compile", {}).get("s")
        out.append(
            f"| {r['model']} | {r.get('params_m', '')} | {'' if compile_s is None else f'{compile_s:.1f}'} | "
            f"{cell(r.get('fx'))} | {cell(r.get('onnx'))} | {cell(r.get('half'))} | {cell(r.get('autocast'))} | "
            f"{verdict(r, fx_alone)} |"
        )
    return "\n".join(out) + "\n"


# --- command line ---------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for sweep.jsonl, sweep.md and logs.tar.gz")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--jobs", type=int, default=6, help="workers at a time")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per worker (6 x 2 on 16 cores)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per model")
    parser.add_argument("--deadline", type=float, help="seconds for the whole run; then unfinished models are dropped")
    parser.add_argument("--models", help="comma-separated names (default: all torchvision models and HF_MODELS)")
    parser.add_argument("--skip", nargs="+", metavar="JSONL", help="skip the models in these earlier sweep.jsonl")
    parser.add_argument("--limit", type=int, help="run at most this many models (after ordering and --skip)")
    parser.add_argument("--scratch", help="where workers write their rows, logs and ONNX files (default: /tmp)")
    parser.add_argument("--report", nargs="+", metavar="JSONL", help="only write the markdown for these files")
    parser.add_argument("--abort-at", metavar="MODEL:STAGE", help="testing: that worker calls os.abort() there")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the driver's worker processes
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if not args.result:
            parser.error("--worker needs --result")
        return worker_main(args)
    if args.report:
        text = markdown(load_rows(args.report))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "sweep.md").write_text(text)
        sys.stdout.write(text)
        return
    if not args.out:
        parser.error("--out is required (or --report)")
    driver_main(args)


if __name__ == "__main__":
    main()
