"""Capture: calibration samples in, an FX graph module out (torch.export, non-strict).

The model is captured where it is; compile() first moves it to the target device (and back after),
so that export, calibration and the compiled module all see the device the module will run on.

High-level ATen ops (linear, layer_norm, scaled_dot_product_attention, conv2d) stay whole: the
exported program is not decomposed. Dims that vary across calibration samples are dynamic, and so
is every input's first (batch) dim; a varying dim that torch.export has to specialize is an error,
a batch dim it specializes is a warning (the graph then takes only that batch size).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import free_symbols

from mpcompiler.errors import CaptureError, InputError
from mpcompiler.ir import META_KEY, GraphRecord, NodeRecord, float_dtype, module_path, op_name
from mpcompiler.samples import Sample, eval_mode, model_device, to_device

log = logging.getLogger(__name__)


def describe_input(path, param_names: list[str]) -> str:
    """A readable name for a leaf of (args, kwargs): ``input_ids``, ``x``, ``args[2][0]``."""
    (group, *rest) = path
    first, *rest = rest
    if group.idx == 0:
        i = first.idx
        head = param_names[i] if i < len(param_names) else f"args[{i}]"
    else:
        head = str(first.key)
    return head + pytree.keystr(tuple(rest))


def _why_static(dim: int, size: int) -> str:
    """Why capture left a dim static: it makes the batch dim and every dim that varies dynamic, and
    refuses to compile where torch.export specializes a varying one."""
    if dim > 0:
        return "it did not vary across the calibration samples"
    return "the first calibration sample has batch size 1" if size == 1 else "torch.export specialized it"


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "a floating-point"
    return "a complex" if dtype.is_complex else "an integer or bool"


@dataclass(frozen=True)
class GraphInput:
    """One tensor input of a graph: its name in forward()'s terms (``x``, ``input_ids``, ``args[2][0]``),
    its shape (an int per static dim, None per dynamic one) and its dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: torch.dtype
    static: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)  # (dim, size) to check

    def __post_init__(self):
        object.__setattr__(self, "static", tuple((d, s) for d, s in enumerate(self.shape) if s is not None))

    def mismatch(self, value, *, exact: bool = False) -> str | None:
        """Why ``value`` cannot be this input, or None when it can. ``exact``: the dtype must be this one
        (a CUDA graph's buffers); otherwise only its kind must agree (the graph casts an fp64 or fp16
        input; an int for a float is a mistake). Called per input per call: a few comparisons."""
        if not isinstance(value, torch.Tensor):
            return f"is a {type(value).__name__}, not a tensor"
        shape = value.shape
        if len(shape) != len(self.shape):
            return f"has {len(shape)} dim{'s' * (len(shape) != 1)} {tuple(shape)}, expected {len(self.shape)}"
        for d, size in self.static:
            if shape[d] != size:
                why = "" if exact else f" (static: {_why_static(d, size)})"
                return f"has size {shape[d]} in dim {d}, expected {size}{why}"
        if value.dtype != self.dtype and (exact or _kind(value.dtype) != _kind(self.dtype)):
            expected = self.dtype if exact else f"{_kind(self.dtype)} dtype like {self.dtype}"
            return f"is {value.dtype}, expected {expected}"
        return None

    def __str__(self) -> str:
        dims = ", ".join("*" if s is None else str(s) for s in self.shape)
        return f"({dims}{',' if len(self.shape) == 1 else ''}) {self.dtype}"


def graph_input_names(gm: torch.fx.GraphModule) -> list[str]:
    """forward()'s names for the positional arguments of ``gm`` (torch.export's codegen keeps them)."""
    return list(gm.graph._codegen.pytree_info.orig_args)


_MISSING = object()


class InputCheck:
    """Checks a call's inputs against the graph's placeholders (their fake tensors' ranks, static sizes
    and dtypes) before it runs: torch.export's own guard says ``Guard failed: x.size()[1] == 16``, or
    nothing (a wrong rank can fail elsewhere; an int for a float is cast). Built once; a call costs a
    few comparisons per input."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.checks: list[tuple[int, GraphInput]] = []
        spec = gm.graph._codegen.pytree_info.in_spec
        placeholders = gm.graph.find_nodes(op="placeholder")
        # torch.export's forward(*orig_args) rebuilds (args, kwargs) by this spec; anything else is not checked
        if not (
            spec.type is tuple
            and spec.num_children == 2
            and spec.child(0).type is tuple
            and spec.child(1).type is dict
            and spec.num_leaves == len(placeholders)
        ):
            return
        self.spec, self.names = spec, graph_input_names(gm)
        self.positional, self.keys = spec.child(0).num_children, spec.child(1).context
        children = [spec.child(0).child(i) for i in range(self.positional)] + spec.child(1).children()
        self.arguments_are_leaves = all(c.is_leaf() for c in children)  # the common case: flattening is free
        leaves = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))[0]
        for i, ((path, _), node) in enumerate(zip(leaves, placeholders, strict=True)):
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                shape = tuple(None if free_symbols(s) else int(s) for s in val.shape)
                self.checks.append((i, GraphInput(describe_input(path, self.names), shape, val.dtype)))

    def __call__(self, args: tuple, kwargs: dict) -> None:
        """Raise InputError naming the first input that does not fit. Calls that do not bind to forward()
        (missing or extra arguments) are left to forward()'s own TypeError."""
        if not self.checks or len(args) + len(kwargs) != len(self.names):
            return
        values = args
        if kwargs:  # bind them as forward(*orig_args) does
            values = [*args, *(kwargs.get(name, _MISSING) for name in self.names[len(args) :])]
            if any(v is _MISSING for v in values):
                return
        if not self.arguments_are_leaves:
            try:
                values = fx_pytree.tree_flatten_spec(
                    (values[: self.positional], dict(zip(self.keys, values[self.positional :], strict=True))),
                    self.spec,
                )
            except Exception:  # a nested argument of another structure: the graph's own flattening says so
                return
        for i, want in self.checks:
            reason = want.mismatch(values[i])
            if reason is not None:
                raise InputError(
                    f"input {want.name} {reason}; the compiled module takes {want.name} as {want} (* any size)"
                )


def _dynamic_dims(
    samples: list[Sample], param_names: list[str], dynamic: Mapping[str, Collection[int]], val_from: int | None
) -> tuple[list, dict[int, set[int]]]:
    """Per leaf of sample 0: the set of dims to make dynamic, and which of those vary (or must be dynamic
    whatever the samples: ``dynamic``, by input name). Samples from ``val_from`` on are val_data's."""
    leaves0, spec0 = pytree.tree_flatten_with_path(samples[0])
    shapes = [[tuple(leaf.shape)] if isinstance(leaf, torch.Tensor) else None for _, leaf in leaves0]
    for index, sample in enumerate(samples[1:], start=1):
        leaves, spec = pytree.tree_flatten_with_path(sample)
        name = (
            f"calibration sample {index}"
            if val_from is None or index < val_from
            else f"val_data sample {index - val_from}"
        )
        if spec != spec0:
            raise CaptureError(
                f"{name} has a different structure from calibration sample 0 (the sample "
                f"used for capture): {spec} vs {spec0}; every sample must pass the same inputs"
            )
        for i, (path, leaf) in enumerate(leaves):
            if shapes[i] is None:
                continue
            if not isinstance(leaf, torch.Tensor) or leaf.dim() != len(shapes[i][0]):
                raise CaptureError(
                    f"input {describe_input(path, param_names)} of {name} has "
                    f"{'shape ' + str(tuple(leaf.shape)) if isinstance(leaf, torch.Tensor) else type(leaf).__name__}"
                    f", but sample 0 has shape {shapes[i][0]}: ranks must agree"
                )
            shapes[i].append(tuple(leaf.shape))
    dims, varying = [], {}
    for i, s in enumerate(shapes):
        if s is None or not s[0]:
            dims.append(set())
            continue
        vary = {d for d in range(len(s[0])) if len({shape[d] for shape in s}) > 1}
        vary |= set(dynamic.get(describe_input(leaves0[i][0], param_names), ()))
        dims.append(vary | {0})
        varying[i] = vary
    return dims, varying


def capture(
    model: torch.nn.Module,
    samples: list[Sample],
    dynamic: Mapping[str, Collection[int]] | None = None,
    val_from: int | None = None,
) -> torch.fx.GraphModule:
    """Export ``model`` on ``samples[0]`` with dynamic dims, on the model's device. ``dynamic`` names dims
    that must stay dynamic whatever the samples (an LLM's sequence length), by input name; ``val_from``: where
    val_data's samples begin among ``samples`` (for errors that name one)."""
    params = list(inspect.signature(model.forward).parameters.values())
    param_names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    dims, varying = _dynamic_dims(samples, param_names, dynamic or {}, val_from)
    leaves, spec = pytree.tree_flatten_with_path(samples[0])

    # torch.export wants dynamic_shapes per forward() argument; build it from the flat leaves.
    leaf_specs = [{d: Dim.AUTO for d in sorted(ds)} or None for ds in dims]
    args_spec, kwargs_spec = pytree.tree_unflatten(leaf_specs, pytree.tree_structure(samples[0]))
    try:
        bound = inspect.signature(model.forward).bind(*args_spec, **kwargs_spec)
    except TypeError as exc:
        extra = len(samples[0][0]) > len(param_names) and not any(p.kind == p.VAR_POSITIONAL for p in params)
        hint = "; a DataLoader of (input, label) pairs: pass the inputs alone, (x for x, _ in loader)" * extra
        raise CaptureError(f"sample 0 does not fit {type(model).__name__}.forward: {exc}{hint}") from exc
    dynamic_shapes = dict(bound.arguments)

    args, kwargs = to_device(samples[0], model_device(model))
    with eval_mode(model):
        try:
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:
            raise _capture_error(model, exc) from exc

    ep = _functionalize(ep)
    gm = ep.module()
    _check_dynamic(gm, leaves, dims, varying, samples, param_names)

    for node in gm.graph.nodes:
        node.meta[META_KEY] = NodeRecord(module_path=module_path(node) if node.op == "call_function" else "")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = pytree.tree_leaves(output.args[0])
    gm.meta[META_KEY] = GraphRecord(
        dtype=torch.float16,
        dynamic_shapes=dynamic_shapes,
        # the dims past the batch's made dynamic: capturing again with these as ``dynamic`` gives the same
        # graph whatever the samples
        dynamic_dims={
            describe_input(path, param_names): sorted(varying[i] - {0})
            for i, (path, _) in enumerate(leaves)
            if varying.get(i, set()) - {0}
        },
        output_dtypes=tuple(float_dtype(o.meta.get("val")) if isinstance(o, torch.fx.Node) else None for o in outputs),
    )
    return gm


def _functionalize(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program without in-place ops. torch.export's IR keeps them (``fill_`` into a slice of a
    fresh tensor, as Swin builds its shifted-window mask; ``relu_``); a write through a view changes
    the view's base, so an op-by-op out-of-place rewrite would lose it. ``run_decompositions({})``
    functionalizes (``slice_scatter`` and the like) and decomposes nothing else. Writes into the
    model's inputs, parameters or buffers are refused: an inference graph must not have them."""
    mutating = [
        n
        for n in ep.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
    ]
    if not mutating:
        return ep
    kinds = torch.export.graph_signature.InputKind
    inputs = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
    for node in mutating:
        base = _view_base(node.args[0]) if node.args else None
        spec = inputs.get(base.name) if isinstance(base, torch.fx.Node) else None
        if spec is not None and spec.kind != kinds.CONSTANT_TENSOR:
            kind = "model input" if spec.kind == kinds.USER_INPUT else "parameter/buffer"
            raise CaptureError(
                f"op {op_name(node)} at {module_path(node) or 'top level'} writes in place into {kind} "
                f"{spec.target or spec.arg.name}; mpcompiler compiles inference graphs that do not mutate "
                "their inputs or state"
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ep.run_decompositions({})


def _view_base(value):
    """The tensor a chain of views (slice, select, view, transpose ...) reads from."""
    while (
        isinstance(value, torch.fx.Node)
        and isinstance(value.target, torch._ops.OpOverload)
        and value.target._schema.returns
        and value.target._schema.returns[0].alias_info is not None
        and value.args
    ):
        value = value.args[0]
    return value


def _check_dynamic(gm, leaves, dims, varying, samples, param_names) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(leaves):  # not expected from torch.export; skip the check, not fail
        log.warning(
            "capture: %d graph inputs for %d sample leaves; dynamic dims not checked", len(placeholders), len(leaves)
        )
        return
    for i, ((path, _), node) in enumerate(zip(leaves, placeholders, strict=True)):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        name = describe_input(path, param_names)
        for d in sorted(dims[i]):
            size = val.shape[d]
            if free_symbols(size):  # still symbolic: dynamic, as asked
                continue
            size = int(size)
            if d in varying.get(i, ()):
                sizes = sorted({pytree.tree_leaves(s)[i].shape[d] for s in samples})
                raise CaptureError(
                    f"dim {d} of input {name} varies across calibration samples ({sizes}), but "
                    f"torch.export specialized it to {size}: the model's code fixes that size "
                    "(a shape check, or a view/reshape with a literal size). Give samples of one size in "
                    "that dim, or make that code shape-generic; TORCH_LOGS=+dynamic shows the guard."
                )
            warnings.warn(
                f"mpcompiler: dim {d} of input {name} is static ({size}): "
                + (
                    "a size-1 dim in the capture sample cannot be made dynamic; capture with a batch of 2 or more"
                    if size == 1
                    else "torch.export specialized it"
                )
                + "; the compiled module accepts only that size",
                stacklevel=3,
            )


def _capture_error(model: torch.nn.Module, exc: Exception) -> CaptureError:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    msg = str(exc)
    if "data-dependent" in msg or "GuardOnDataDependent" in type(exc).__name__:
        hint = (
            "the model branches on a tensor's value; make the branch depend on shapes or constants, or use torch.cond"
        )
    elif "Dynamic" in type(exc).__name__ or "Constraints violated" in msg:
        hint = "a dim marked dynamic cannot stay dynamic; give calibration samples of one shape in that dim"
    elif "Cache'> in output" in msg:  # a Hugging Face LM returns its KV cache unless told not to
        hint = (
            "the model returns its KV cache; compile it for generation with max_seq=... (a static cache in the "
            "compiled program), or pass use_cache=False in the calibration samples for its logits alone"
        )
    else:
        hint = (
            "check that model(*args, **kwargs) runs on the first calibration sample, and see "
            "torch.export's troubleshooting guide (torch.export.draft_export reports every issue at once)"
        )
    return CaptureError(
        f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {first}\nTry: {hint}"
    )
