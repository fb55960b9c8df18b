"""A Triton model folder from ``compiled.export_triton`` served by a real Triton server (pytriton's), and
asked for one batch: what a deployment team's first request does.

Two steps, two environments (nvidia-pytriton needs numpy < 2, which this project's torch does not use):

    python -m examples.triton_serve prepare DIR     # this project's environment: DIR/repo/mlp, DIR/sample.npz
    python examples/triton_serve.py serve DIR        # a venv with nvidia-pytriton and onnxruntime

``prepare`` compiles a small MLP, writes its Triton folder (``DIR/repo/mlp``: config.pbtxt and 1/model.onnx)
and a batch with the compiled module's outputs (``DIR/sample.npz``). ``serve`` reads config.pbtxt with
Triton's own protobuf (tritonclient's ``model_config_pb2``), starts pytriton's Triton server with a model of
those inputs, outputs, max batch size and dynamic batching whose inference function runs the folder's
model.onnx in ONNX Runtime (pytriton bundles only Triton's python backend, not the onnxruntime backend the
config names), sends the batch through Triton's HTTP endpoint and prints the answer's error against the
compiled module. docs/deploy.md says what this checks and what it does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def prepare(folder: Path) -> None:
    import mpcompiler
    from tests.cli_model import build, samples

    data = samples()
    compiled = mpcompiler.compile(build(), data)
    compiled.export_triton(folder / "repo", "mlp", max_batch_size=16, kind="cpu")
    np.savez(folder / "sample.npz", x=data[0].numpy(), output=compiled(data[0]).detach().numpy())
    print(f"wrote {folder / 'repo' / 'mlp'} and {folder / 'sample.npz'}")


def serve(folder: Path) -> None:
    import onnxruntime as ort
    from google.protobuf import text_format
    from pytriton.client import ModelClient
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig
    from tritonclient.grpc import model_config_pb2 as mc

    model = folder / "repo" / "mlp"
    cfg = text_format.Parse((model / "config.pbtxt").read_text(), mc.ModelConfig())
    types = {mc.TYPE_FP32: np.float32, mc.TYPE_FP16: np.float16, mc.TYPE_INT64: np.int64, mc.TYPE_INT32: np.int32}
    session = ort.InferenceSession(str(model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in cfg.output]

    @batch
    def infer(**inputs):
        return dict(zip(names, session.run(names, inputs), strict=True))

    def tensors(values):
        return [Tensor(name=v.name, dtype=types[v.data_type], shape=tuple(v.dims)) for v in values]

    sample = np.load(folder / "sample.npz")
    with Triton(config=TritonConfig(http_port=8765, grpc_port=8766, metrics_port=8767)) as triton:
        batcher = DynamicBatcher() if cfg.HasField("dynamic_batching") else None
        triton.bind(model_name=cfg.name, infer_func=infer, inputs=tensors(cfg.input), outputs=tensors(cfg.output),
                    config=ModelConfig(max_batch_size=cfg.max_batch_size, batcher=batcher))  # fmt: skip
        triton.run()
        with ModelClient("localhost:8765", cfg.name, init_timeout_s=120) as client:
            got = client.infer_batch(**{i.name: sample[i.name] for i in cfg.input})[names[0]]
    want = sample[names[0]]
    error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"Triton served {cfg.name} (max_batch_size {cfg.max_batch_size}, dynamic batching {batcher is not None}): "
          f"a batch of {len(got)}, rel. L2 vs the compiled module {error:.2e}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "serve"):
        raise SystemExit(__doc__)
    (prepare if sys.argv[1] == "prepare" else serve)(Path(sys.argv[2]))
