"""The FX artifact's fastest mode on the GPU: Inductor's kernels replayed as one CUDA graph.

``compiled.cuda_graph(example)`` lowers a copy of the emitted module for cuDNN (``channels_last`` weights,
conv + bias [+ residual] + relu as one kernel: ``lower_fused``; dumped in the dump folder's ``cuda_graph/``),
compiles it with ``torch.compile``
(Inductor's fusions, no CUDA graphs of its own), captures one call on the example's shapes in a
``torch.cuda.CUDAGraph``, and returns a callable that copies its inputs into the graph's static
buffers and replays it. A call then costs the GPU work and one graph launch: no Python per op, no
dynamo guards, no CUDA-graph-tree bookkeeping, which is what bounds small batches under
``torch.compile(mode="reduce-overhead")``.

Like ONNX Runtime's ``enable_cuda_graph``, a capture is for one set of input shapes and dtypes; a
call with others is an error naming the input. Outputs are copied out of the graph's buffers, so
they stay valid after the next call.
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx
import torch.utils._pytree as pytree

from mpcompiler.capture import GraphInput, describe_input, graph_input_names
from mpcompiler.emit_fx import twin
from mpcompiler.errors import OptionError
from mpcompiler.pass_manager import PassManager
from mpcompiler.passes import ChannelsLast, LowerFused
from mpcompiler.samples import model_device

WARMUP = 3  # calls before capture: compilation, cuDNN's algorithm search and lazy cuBLAS setup happen here


@contextlib.contextmanager
def _cudnn_autotuned():
    """cuDNN times its convolution algorithms for these shapes during warm-up (the capture then
    records the fastest); the process's own setting is restored afterwards."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


class CudaGraphModule:
    """A compiled module captured as one CUDA graph for fixed input shapes. Call it like the model."""

    def __init__(
        self, gm: torch.fx.GraphModule, args: tuple, kwargs: dict, autotune: bool = False, dump_dir=None, debug=False
    ):
        device = model_device(gm)
        if not torch.cuda.is_available():
            raise OptionError("cuda_graph() needs a CUDA GPU; torch.cuda.is_available() is False")
        if device.type != "cuda":
            raise OptionError(
                f"cuda_graph() needs the compiled module on the GPU (its weights are on {device}); "
                "compile with device='cuda' or call compiled.to('cuda') first"
            )
        # On a copy of the graph: convolutions run fastest in NHWC on tensor cores, so weights (the copy's
        # own) and image inputs go channels_last, and conv + bias [+ residual] + relu become one cuDNN kernel.
        gm = twin(gm, "MpCompiledModuleCudaGraph")
        self.runs = PassManager([ChannelsLast(), LowerFused(target="fx-cuda")], dump_dir=dump_dir, debug=debug).run(gm)
        self.channels_last = self.runs[0].result.modified
        self._inputs(args, kwargs, graph_input_names(gm), device)
        # max-autotune: Inductor times its Triton GEMM templates (bias, GELU, residual fused into their
        # epilogues) against cuBLAS for these fixed shapes and keeps the faster; its own CUDA graphs stay off
        fn = torch.compile(gm, dynamic=False, mode="max-autotune-no-cudagraphs" if autotune else None)
        self._capture(fn, device, WARMUP)

    @classmethod
    def of(cls, fn, kwargs: dict, pool=None) -> CudaGraphModule:
        """``fn`` (compiled already) captured as one CUDA graph on copies of ``kwargs``, after one warm-up call on
        those copies (the tensors a compiled function's guards saw must be the capture's: a row slice's storage
        offset, say, recompiles it, and a recompile inside a capture fails it), its memory from ``pool``
        (``torch.cuda.graph_pool_handle()``; graphs that share one must not run at once). Raises what the warm-up
        or the capture raises."""
        self = cls.__new__(cls)
        self.runs, self.channels_last = [], False
        device = next(v.device for v in kwargs.values() if isinstance(v, torch.Tensor))
        self._inputs((), kwargs, list(kwargs), device)
        self._capture(fn, device, 1, pool)
        return self

    def _inputs(self, args: tuple, kwargs: dict, names: list[str], device: torch.device) -> None:
        """The static buffers a replay reads, copies of ``(args, kwargs)``, and their names, shapes and dtypes."""
        self.kwarg_names = tuple(kwargs)
        leaves, self.spec = pytree.tree_flatten_with_path((args, kwargs))
        self.names = [describe_input(p, names) for p, _ in leaves]
        self.static = [self._buffer(v, device) for _, v in leaves]
        # the capture's exact shapes and dtypes: a replay reads its buffers as they are
        self.inputs = [
            GraphInput(name, tuple(b.shape), b.dtype) if isinstance(b, torch.Tensor) else None
            for name, b in zip(self.names, self.static, strict=True)
        ]

    def _capture(self, fn, device: torch.device, warmup: int, pool=None) -> None:
        static_args, static_kwargs = pytree.tree_unflatten(self.static, self.spec)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with _cudnn_autotuned(), torch.no_grad():
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(*static_args, **static_kwargs)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph, pool=pool):
                    self.outputs = fn(*static_args, **static_kwargs)
            except RuntimeError as exc:
                raise OptionError(
                    f"the compiled module cannot be captured as a CUDA graph (an op syncs with the CPU or "
                    f"allocates outside the graph): {exc}; use torch.compile(compiled.graph_module) instead"
                ) from exc

    def _buffer(self, value, device: torch.device):
        if not isinstance(value, torch.Tensor):
            return value
        fmt = torch.channels_last if self.channels_last and value.dim() == 4 else torch.contiguous_format
        return torch.empty_like(value, device=device, memory_format=fmt).copy_(value)

    def __call__(self, *args, **kwargs):
        self.load(*args, **kwargs)
        return pytree.tree_map_only(torch.Tensor, torch.clone, self.replay())

    def load(self, *args, **kwargs) -> None:
        """Copy inputs like the model's into the graph's buffers (each checked against the capture's)."""
        if set(kwargs) == set(self.kwarg_names):  # keyword arguments in any order
            kwargs = {name: kwargs[name] for name in self.kwarg_names}
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.spec:
            raise OptionError(f"this CUDA graph was captured for inputs shaped like {self.spec}; got {spec}")
        for name, want, buffer, value in zip(self.names, self.inputs, self.static, leaves, strict=True):
            if want is None:
                if value != buffer:
                    raise OptionError(f"input {name} was {buffer!r} at capture; got {value!r}")
            else:
                reason = want.mismatch(value, exact=True)
                if reason is not None:
                    raise OptionError(
                        f"input {want.name} {reason}: this CUDA graph was captured for {want}; "
                        "capture another with compiled.cuda_graph(...) for that shape"
                    )
                buffer.copy_(value, non_blocking=True)

    def replay(self):
        """Replay the graph on its buffers as they are (what :meth:`load`, or the graph itself, left in them)
        and return its own output buffers, which the next replay overwrites."""
        self.graph.replay()
        return self.outputs
