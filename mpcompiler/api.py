"""The public entry point: ``mpcompiler.compile(model, calib_data, **options)``."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx

from mpcompiler import dtypes, fp8
from mpcompiler.accuracy import METRICS, Metric, measure, output_names, references
from mpcompiler.capture import InputCheck, capture
from mpcompiler.cuda_graph import CudaGraphModule
from mpcompiler.emit_fx import emit_fx, retarget
from mpcompiler.emit_onnx import export_onnx
from mpcompiler.errors import CaptureError, InputError, OptionError, ToleranceError
from mpcompiler.files import clear_dumps
from mpcompiler.ir import graph_record
from mpcompiler.llm import (
    CALIB_NEW_TOKENS,
    SEQ_INPUTS,
    Generator,
    LMOptions,
    capture_example,
    check_attention_span,
    sequences,
    whole_sequence_inputs,
)
from mpcompiler.pass_manager import Pass, PassManager
from mpcompiler.passes import (
    AssignFp8,
    AssignPrecision,
    CalibrateRanges,
    CleanGraph,
    EliminateCasts,
    FoldBatchNorm,
    InsertCasts,
    LowerFp8,
    LowerFused,
    PlaceCasts,
    SearchPrecision,
)
from mpcompiler.passes.calibrate_ranges import Calibration
from mpcompiler.report import Report
from mpcompiler.samples import as_sample, collect_samples, model_device, on_device
from mpcompiler.triton_repo import export_triton

log = logging.getLogger("mpcompiler")

MAX_HELD_OUT = 4  # samples held back from calibration to measure the error on, by default

AUTO = "auto"  # fp16 where it is safe, bf16 where fp16's range is too small, fp32 where bf16's is too


@dataclass(frozen=True)
class Options:
    """compile()'s options, validated. Build with :meth:`parse`."""

    dtype: torch.dtype = torch.float16
    fallback: torch.dtype | None = None  # dtype="auto": bf16, where the device has bf16 kernels
    fp8: bool = False  # dtype="fp8": e4m3 linears where the plan (and the tolerance) allows, fp16 elsewhere
    keep_fp32: tuple[str, ...] = ()
    dump_dir: Path | None = None
    device: torch.device | None = None
    debug: bool = False
    tolerance: float | None = None
    metric: Metric = METRICS["rel_l2"]

    @classmethod
    def parse(
        cls, *, dtype, keep_fp32, dump_dir, device, debug, tolerance=None, metric=None, language_model=False
    ) -> Options:
        auto = isinstance(dtype, str) and dtype == AUTO
        fp8 = isinstance(dtype, (str, torch.dtype)) and dtype in dtypes.FP8_SPELLINGS
        if not (auto or fp8) and dtypes.parse(dtype) is None:
            raise OptionError(f"dtype={dtype!r} is not supported; use 'float16', 'bfloat16', 'auto' or 'fp8'")
        if isinstance(keep_fp32, str):
            keep_fp32 = (keep_fp32,)
        if not isinstance(keep_fp32, Sequence) or not all(isinstance(k, str) and k for k in keep_fp32):
            raise OptionError(f"keep_fp32 must be a module path or op name, or a list of them; got {keep_fp32!r}")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as exc:
                raise OptionError(f"device={device!r} is not a torch device: {exc}") from exc
            if device.type == "cuda" and not torch.cuda.is_available():
                raise OptionError(f"device={str(device)!r} asked for, but torch.cuda.is_available() is False")
        if debug is None:
            debug = os.environ.get("MPCOMPILER_DEBUG", "") not in ("", "0")
        if not isinstance(debug, bool):
            raise OptionError(f"debug must be True or False; got {debug!r}")
        if metric is None:
            metric = "perplexity" if language_model else "rel_l2"
        if callable(metric):
            metric = Metric(getattr(metric, "__name__", "custom metric"), metric, given=True)
        elif metric in METRICS:
            metric = METRICS[metric]
        else:
            raise OptionError(f"metric={metric!r}: use one of {sorted(METRICS)}, or a callable(outputs, refs) -> error")
        if metric.reads_samples and not language_model:
            raise OptionError(f"metric={metric.name!r} judges a language model's text: compile with max_seq=...")
        if tolerance is not None:
            if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
                raise OptionError(f"tolerance must be a positive number; got {tolerance!r}")
            if metric.higher_is_better and tolerance > 1:
                raise OptionError(f"tolerance for metric {metric.name!r} is a similarity in (0, 1]; got {tolerance!r}")
        return cls(
            tolerance=None if tolerance is None else float(tolerance),
            metric=metric,
            dtype=torch.float16 if auto or fp8 else dtypes.parse(dtype),
            fallback=torch.bfloat16 if auto else None,
            fp8=fp8,
            keep_fp32=tuple(keep_fp32),
            dump_dir=_writable_dir(dump_dir) if dump_dir is not None else None,
            device=device,
            debug=debug,
        )


def _writable_dir(dump_dir) -> Path:
    """``dump_dir`` created if missing and checked to take files, before any work: the first dump
    comes after capture, the report after the whole compile, and both would be lost. An earlier
    compile's dumps there are removed (a pass that does not change the graph this time writes none)."""
    try:
        path = Path(dump_dir)
    except TypeError as exc:
        raise OptionError(f"dump_dir must be a path; got {dump_dir!r}") from exc
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):  # as write_atomic does: a file beside the artifacts
            pass
    except OSError as exc:
        # mkdir's errno names the path, not which part of it is a file: find the part
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        why = (
            f"{blocker} is a file, not a directory"
            if blocker is not None and not blocker.is_dir()
            else exc.strerror or str(exc)
        )
        raise OptionError(f"dump_dir={str(path)!r} cannot be created or written to: {why}") from exc
    clear_dumps(path)
    return path


def has_bf16_kernels(device: torch.device) -> bool:
    """Whether bf16 math runs on ``device``: torch's CPU kernels have bf16; a GPU must support it."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def pipeline(
    options: Options, samples: list, device: torch.device, val=(), refs=list, calibration: Calibration | None = None
) -> list[Pass]:
    """The passes, in order. calibrate_ranges adds the samples' statistics to ``calibration`` (other
    processes'); search_precision runs only with a tolerance; it re-plans with a pipeline of its own,
    assign_precision and place_casts (dumped in the dump folder's ``search/``)."""
    assign = AssignPrecision(
        dtype=options.dtype,
        fallback=options.fallback if has_bf16_kernels(device) else None,
        keep_fp32=options.keep_fp32,
    )
    place = PlaceCasts()
    plan_fp8 = [AssignFp8()] if options.fp8 else []
    # each plan the search tries is re-derived by these; the dumps are of the plan it chose (the last run)
    replan = PassManager(
        [assign, *plan_fp8, place],
        dump_dir=options.dump_dir / "search" if options.dump_dir is not None else None,
        debug=options.debug,
    )
    search = SearchPrecision(
        tolerance=options.tolerance,
        metric=options.metric,
        replan=replan,
        calib_samples=samples,
        val_samples=val,
        val_refs=refs,
        device=device,
    )
    return [
        CleanGraph(),
        FoldBatchNorm(),
        LowerFused(target="fx-cuda" if device.type == "cuda" else "fx-cpu"),
        CalibrateRanges(samples=samples, device=device, prior=calibration),
        assign,
        *plan_fp8,
        place,
        *([search] if options.tolerance is not None else []),
        InsertCasts(),
        EliminateCasts(),
        *([LowerFp8()] if options.fp8 else []),
    ]


class CompiledModule(torch.nn.Module):
    """The compiled model: call it like the original; ``graph_module`` and ``report`` show what it is.

    ``val_samples`` and ``val_refs`` are the samples held back from calibration and the fp32
    model's flat outputs on them: export_onnx() checks the ONNX artifact on them, and
    ``report.accuracy`` was measured on them (with a tolerance, on those the search did not judge
    plans on: the second half).
    """

    def __init__(
        self,
        graph_module: torch.fx.GraphModule,
        report: Report,
        options: Options,
        val_samples,
        val_refs,
        lm=None,
        defaults: dict | None = None,
    ):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.options = options
        self.val_samples = val_samples
        self.val_refs = val_refs
        self.input_check = InputCheck(graph_module)
        self.lm = lm  # LMOptions: compiled for generation
        self._generator = None
        self.defaults = defaults or {}  # the model's keyword arguments no sample passed: the default captured

    def _drop_defaults(self, kwargs: dict) -> None:
        """Drop keyword arguments the samples never passed (``use_cache``) where they equal the default
        the module was captured with; another value is an InputError (the graph has no input for it)."""
        for name in [k for k in kwargs if k in self.defaults]:
            value, default = kwargs.pop(name), self.defaults[name]
            same = type(value) is type(default) and not torch.is_tensor(value) and value == default
            if not (value is default or same):
                raise InputError(
                    f"{name}={value!r}: no calibration sample passed {name}, so the module was captured with "
                    f"the model's default, {name}={default!r}; to compile it with another value, pass "
                    f"{name} in calib_data's samples (as keyword arguments)"
                )

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
        """Generate from a causal LM compiled with ``max_seq``, like Hugging Face's ``generate``: prompts
        as token ids [batch, seq] (left-padded, with their ``attention_mask``), and ``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``min_new_tokens``,
        ``eos_token_id``, ``pad_token_id``, ``generator``, and ``streamer`` (transformers'
        ``TextStreamer``/``TextIteratorStreamer`` or any object with ``put(token_ids)`` and ``end()``: the
        prompt, then each new token as it is chosen).
        Returns the prompts and their new tokens, [batch, seq + new]; a row that met an eos token is
        padded after it. Runs prefill and decode steps with a static KV cache
        (:mod:`mpcompiler.llm`)."""
        return self.generator.generate(input_ids, attention_mask, **options)

    @property
    def generator(self) -> Generator:
        """The generation program (:class:`mpcompiler.llm.Generator`), built on first use: called with
        ``(input_ids, attention_mask over the cache's slots, position_ids, cache_position)``, one prefill
        or decode step with the static KV cache, it returns the last position's logits."""
        if self.lm is None:
            raise OptionError("generate() needs a causal LM compiled for it: compile(model, prompts, max_seq=...)")
        if self._generator is None:
            self._generator = Generator(self.graph_module, self.lm, self.options.dump_dir, self.options.debug)
        return self._generator

    def forward(self, *args, **kwargs):
        """Run the compiled graph. An input of another rank, another size in a static dim, or another
        kind of dtype than the module was compiled for is an :class:`~mpcompiler.InputError` naming it. A causal
        LM compiled for generation takes what the model does (``compiled(**tokenizer(text)).logits``): the
        inputs its samples passed and the call did not are filled as generate() fills them."""
        if kwargs and self.defaults:
            self._drop_defaults(kwargs)
        if self.lm is not None:
            args, kwargs = whole_sequence_inputs(args, kwargs, self.input_check.names)
        self.input_check(args, kwargs)
        return self.graph_module(*args, **kwargs)

    export_onnx = export_onnx  # export_onnx(compiled, path, ...): the ONNX artifact, see its docstring
    export_triton = export_triton  # export_triton(compiled, repo, name, ...): a Triton model repository

    def cuda_graph(self, example, *, autotune: bool = False) -> CudaGraphModule:
        """The fastest mode on the GPU: this module under ``torch.compile``, captured as one CUDA graph
        for the shapes of ``example`` (a sample as in calib_data: a tensor, a tuple of positional
        arguments or a dict of keyword arguments); see :mod:`mpcompiler.cuda_graph`. Call the result
        like the model with inputs of those shapes. Models with 2-D convolutions run there with
        channels_last copies of their weights (this module keeps its own). ``autotune``: Inductor's
        max-autotune for these shapes (each GEMM's Triton templates, epilogues fused, timed against
        cuBLAS; minutes of compiling)."""
        args, kwargs = as_sample(example, 0, "example")
        dumps = self.options.dump_dir / "cuda_graph" if self.options.dump_dir is not None else None
        return CudaGraphModule(self.graph_module, args, kwargs, autotune, dumps, self.options.debug)

    def to(self, *args, **kwargs):
        """Move to another device. The dtypes are the compiled plan's: to change them, compile again."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            raise OptionError("a compiled module's dtypes are its precision plan; compile again with dtype=...")
        if device is not None:
            retarget(self.graph_module, device)
        return self


def compile(
    model: torch.nn.Module,
    calib_data: Iterable,
    *,
    dtype: str | torch.dtype = "float16",
    keep_fp32: str | Sequence[str] = (),
    val_data: Iterable | None = None,
    dump_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    debug: bool | None = None,
    tolerance: float | None = None,
    metric: str | Callable | None = None,
    held_out: int | None = None,
    max_seq: int | None = None,
    max_batch: int | None = None,
    calibration: Calibration | None = None,
) -> CompiledModule:
    """Compile ``model`` to mixed precision, calibrated on ``calib_data``.

    Args:
        model: the fp32 ``torch.nn.Module``; it is captured in eval mode and left unchanged.
        calib_data: an iterable of samples (read once): a tensor, a tuple/list of positional
            arguments, or a dict of keyword arguments each. The first is the example for capture.
        dtype: the low-precision dtype, ``"float16"`` or ``"bfloat16"``; or ``"auto"``: fp16 where
            it is safe, bf16 for the nodes where fp16 would overflow or underflow (if the device has
            bf16 kernels), fp32 where bf16 would overflow too; or ``"fp8"``: fp16, and e4m3 GEMMs (static
            scales from calibration) for the linears the plan and the tolerance allow, on a GPU of compute
            capability 8.9+ (with ``max_seq``, the 1-row decode graph reads their e4m3 weights with fp16 inputs);
            the report gives each one's scales and how often held-out inputs saturate its e4m3 range.
        keep_fp32: module paths (``"encoder.layer.3.attention"``, matching that module and all
            inside it) and op names (``"softmax"``) to keep in fp32.
        val_data: samples to measure the error vs fp32 on (``report.accuracy``). Default: the last
            fifth of calib_data (at most 4 samples) is held back from calibration for that; with
            fewer than 5 samples none is held back and the error is measured on calibration samples.
        dump_dir: where to write one IR dump per pass that changed the graph and ``report.json``.
        device: where the compiled module runs (and calibration runs); default: the model's device.
        debug: check the IR after every pass and dump every pass (default: env MPCOMPILER_DEBUG).
        tolerance: the accuracy to meet on the held-out samples, judged by ``metric``. With it, the
            most sensitive ops are kept in fp32 until it is met (search_precision); a ToleranceError
            says when only all-fp32 would meet it. Default None: the rules alone decide.
        metric: ``"rel_l2"`` (the default; relative L2 error vs fp32, the worst output; met when <= tolerance),
            ``"cosine"`` (the lowest cosine similarity of an output to fp32's over samples; met when
            >= tolerance), ``"top1"`` (share of rows whose argmax over the last dim of the first output
            agrees with fp32's; met when >= tolerance), or a callable ``(outputs, refs) -> error``
            over lists (per sample) of flat output tensors, met when <= tolerance. For a language
            model (``max_seq``) also ``"perplexity"`` (its default: the compiled model's perplexity
            on the held-out text over fp32's, less 1; 0.005 is 0.5% higher) and ``"greedy"`` (the
            share of the text's positions where its most likely next token is fp32's).
        held_out: how many of calib_data's last samples to hold back (instead of ``val_data``);
            default: a fifth, at most 4. The tolerance search judges plans on them and the report's
            error is measured on them: more samples make both less noisy.
        max_seq: compile a causal LM for generation (``compiled.generate``), with a static KV cache
            of this many tokens (prompt and new tokens). calib_data (and val_data) are then prompts:
            token ids [batch, seq] or a tokenizer's output (left-padded); each is continued by the
            fp32 model's greedy tokens, and the model is calibrated on those whole sequences.
        max_batch: the rows of the KV cache, the largest batch ``generate`` takes (default 1).
        calibration: statistics :func:`calibrate` gathered on other samples (in other processes, merged
            with :meth:`Calibration.merge`): calib_data's calibration samples (those not held out) are
            added to them, and the ranges are those of all. The model is captured with their dynamic
            dims; they must be of this model's graph (a CalibrationError names the first value that
            differs).

    Returns:
        A :class:`CompiledModule`, called like ``model``.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    low = {p.dtype for p in model.parameters() if p.is_floating_point()}  # buffers may stay fp32 (HF's inv_freq)
    if low and low <= {torch.float16, torch.bfloat16}:  # a model cast whole; one with fp16 parts of its own is planned
        raise OptionError(
            f"the model's floating-point weights are all {'/'.join(sorted(str(d)[6:] for d in low))}: mpcompiler "
            "plans from the fp32 model (the ranges it measures, and the reference every error is measured "
            "against); pass model.float() (a Hugging Face model: from_pretrained(..., dtype=torch.float32))"
        )
    lm = LMOptions.parse(max_batch, max_seq)
    if lm is not None:
        check_attention_span(model, lm.max_seq)  # a sliding window the KV cache's mask would not heed
    options = Options.parse(
        dtype=dtype,
        keep_fp32=keep_fp32,
        dump_dir=dump_dir,
        device=device,
        debug=debug,
        tolerance=tolerance,
        metric=metric,
        language_model=lm is not None,
    )
    if calibration is not None and not isinstance(calibration, Calibration):
        raise OptionError(f"calibration= takes what mpcompiler.calibrate() returns; got {type(calibration).__name__}")
    if calibration is not None and lm is not None:
        raise OptionError(
            "calibration= is not supported with max_seq yet: calibrate a causal LM on all its prompts in the "
            "process that compiles it"
        )
    samples = collect_samples(calib_data)
    if held_out is not None and val_data is not None:
        raise OptionError("give val_data or held_out, not both: held_out holds back part of calib_data instead")
    if held_out is not None and (
        isinstance(held_out, bool) or not isinstance(held_out, int) or not 0 <= held_out < len(samples)
    ):
        raise OptionError(f"held_out must count calib_data's samples, 0 to {len(samples) - 1}; got {held_out!r}")
    if val_data is not None:
        val, held = collect_samples(val_data, "validation"), True
    else:
        count = min(MAX_HELD_OUT, len(samples) // 5) if held_out is None else held_out
        held = count > 0
        val = samples[len(samples) - count :] if held else samples[:MAX_HELD_OUT]
        samples = samples[: len(samples) - count]
    target_device = options.device or model_device(model)
    why_not = fp8.supported(target_device) if options.fp8 else None
    if why_not is not None:
        raise OptionError(f"dtype='fp8' needs e4m3 GEMMs: {why_not}")
    with on_device(model, target_device):
        if lm is not None:  # calibration prompts continued by the fp32 model; held-out text as it is
            samples = sequences(model, samples, CALIB_NEW_TOKENS, lm.max_seq)
            val = sequences(model, val, 0, lm.max_seq)
            gm = capture(model, [capture_example(samples[0]), *samples, *(val if held else [])], SEQ_INPUTS)
        else:  # with statistics of other processes: their graph's dynamic dims, so that the graphs agree
            val_from = len(samples) if val_data is not None else None  # held_out's keep their calib_data indices
            gm = capture(model, samples + val if held else samples, calibration.dynamic if calibration else None,
                         val_from)  # fmt: skip
        # after calibration, whose errors name the node; before the search, which needs them
        val_refs = functools.cache(lambda: references(model, val, target_device))
        # the search judges plans on the first half of the held-out samples, the report's error is
        # measured on the rest: a plan chosen on samples is not also judged on them
        searched = (len(val) + 1) // 2 if options.tolerance is not None and len(val) > 1 else 0
        search_val = val[:searched] or val
        search_refs = functools.cache(lambda: val_refs()[: len(search_val)])
        passes = pipeline(options, samples, target_device, search_val, search_refs, calibration)
        runs = PassManager(passes, dump_dir=options.dump_dir, debug=options.debug).run(gm)
        refs = val_refs()
        graph_module = emit_fx(gm, model)
    accuracy = measure(
        graph_module,
        val[searched:],
        refs[searched:],
        output_names(graph_module),
        device=target_device,
        held_out=held,
        metric=options.metric,
        tolerance=options.tolerance,
        language_model=lm is not None,
        searched=searched if options.tolerance is not None else None,
    )
    if graph_record(graph_module).fp8 and held:  # issue #13: how often held-out inputs pass their e4m3 range
        fp8.measure_saturation(graph_module, val[searched:], target_device)
    report = Report.from_graph(graph_module, runs, accuracy)
    if options.dump_dir is not None:
        report.save(options.dump_dir / "report.json")
        if report.search is not None and importlib.util.find_spec("matplotlib") is not None:
            report.plot(options.dump_dir / "precision.png")  # the optional extra mpcompiler[plot]
    log.info("%s", report)
    if accuracy.met is False and not searched:  # the search judged this plan on these samples: a bug
        raise ToleranceError(f"the emitted module misses the tolerance the search met: {accuracy}")
    if accuracy.met is False:
        warnings.warn(
            f"mpcompiler: the plan met the tolerance on the {searched} held-out samples the search judged it on, "
            f"but not on the others: {accuracy}. Hold out more samples (held_out=, val_data=) or tighten the "
            "tolerance",
            stacklevel=2,
        )
    return CompiledModule(graph_module, report, options, val, refs, lm, _uncaptured_defaults(model, graph_module))


def calibrate(
    model: torch.nn.Module,
    calib_data: Iterable,
    *,
    device: str | torch.device | None = None,
    dynamic: dict[str, Sequence[int]] | None = None,
) -> Calibration:
    """Calibration statistics of ``model`` over every sample of ``calib_data``, for calibrating in several
    processes: each calibrates on its part of the samples and saves them (:meth:`Calibration.save`); one
    loads and merges them (:meth:`Calibration.load`, :meth:`Calibration.merge`) and compiles with
    ``compile(model, calib_data, calibration=merged)``, whose own calibration samples are added. The
    statistics are sums and extremes: two halves merged are the whole's (the histograms of tensors over
    2**20 values are of random subsets). They are of one captured graph, whose dynamic dims are those that
    vary across the samples: where one process's samples vary in a dim and another's do not, give every
    process ``dynamic`` (input name -> dims, e.g. ``{"input_ids": [1]}``) so that all capture alike."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    options = Options.parse(dtype="float16", keep_fp32=(), dump_dir=None, device=device, debug=None)
    samples = collect_samples(calib_data)
    target_device = options.device or model_device(model)
    with on_device(model, target_device):
        gm = capture(model, samples, dynamic)
        passes = pipeline(options, samples, target_device)
        calibrating = next(p for p in passes if isinstance(p, CalibrateRanges))
        PassManager(passes[: passes.index(calibrating) + 1], debug=options.debug).run(gm)
    return calibrating.calibration


def _uncaptured_defaults(model: torch.nn.Module, graph_module: torch.fx.GraphModule) -> dict:
    """The model's forward parameters with a default that are not the graph's inputs: by name, that default."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): nothing to accept
        return {}
    inputs = set(graph_module.graph._codegen.pytree_info.orig_args)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params if p.kind in kinds and p.name not in inputs and p.default is not p.empty}
