"""Generation with a causal LM: ``compile(lm, prompts, max_seq=...)`` and ``compiled.generate(...)``.

The pipeline compiles the model on whole sequences: each calibration prompt continued by the fp32
model's own greedy tokens (:func:`sequences`), as ``input_ids``, ``attention_mask`` and ``position_ids``
(left padding: positions count from a row's first token). The values a prefill and the decode steps
after it compute are exactly those of that sequence run at once, so calibration, the precision plan
and the tolerance search see the KV cache's keys and values and the residual stream as the cache fills.

For generation, ``insert_kv_cache`` rewrites a copy of the planned graph into one step of a static-cache
program (``passes/insert_kv_cache.py``); :class:`Generator` runs its prefill and decode steps, choosing
tokens as Hugging Face's ``generate`` does (greedy, or sampling with temperature, top-k and top-p) and
returning the prompt and the new tokens, finished rows padded.

On the GPU a decode step is one CUDA graph replay (``lower_decode_step`` rewrites a copy of the step for
it, then :mod:`mpcompiler.cuda_graph`: Inductor's kernels for the fixed shapes of one new token over the
cache's first rows, one graph per power-of-two batch size up to ``max_batch``, captured on first use;
rows past the batch are idle); the prefill runs the step under torch.compile at its length, as
``lower_prompt_step`` rewrites it for a prompt without padding (attention causal over the prompt's own
keys, SDPA's flash kernel, not over every slot of the cache under a mask).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mpcompiler.accuracy import output_names
from mpcompiler.cuda_graph import CudaGraphModule
from mpcompiler.emit_fx import twin
from mpcompiler.errors import CaptureError, InputError, OptionError
from mpcompiler.pass_manager import PassManager
from mpcompiler.passes import (
    CarryDecodeState,
    InsertKvCache,
    LowerDecodeStep,
    LowerFused,
    LowerPromptStep,
    carry_decode_state,
)
from mpcompiler.samples import Sample, model_device

CALIB_NEW_TOKENS = 16  # greedy tokens each calibration prompt is continued with
PROMPT_GRAPHS = 16  # prompt shapes a generator keeps a CUDA graph of (in one memory pool: they never run at once)
PDL = True  # decode graphs launch their kernels with programmatic dependent launch where the GPU has it (Hopper on)
STOP_CHECK = 8  # decode steps between reads of whether every row has stopped (each read waits for the GPU)
SEQ_INPUTS = {"input_ids": (1,), "attention_mask": (1,), "position_ids": (1,)}  # capture keeps these dynamic


@dataclass(frozen=True)
class LMOptions:
    """compile()'s generation options: the KV cache's rows and slots."""

    max_batch: int
    max_seq: int

    @classmethod
    def parse(cls, max_batch, max_seq) -> LMOptions | None:
        if max_seq is None:
            if max_batch is not None:
                raise OptionError("max_batch is a generation option: give max_seq too (the KV cache's length)")
            return None
        for name, value in (("max_seq", max_seq), ("max_batch", max_batch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise OptionError(f"{name} must be a positive int; got {value!r}")
        return cls(max_batch=max_batch or 1, max_seq=max_seq)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: each row counts from its first token (pads at 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def whole_sequence_inputs(args: tuple, kwargs: dict, names: list[str]) -> tuple[tuple, dict]:
    """The inputs of a causal LM compiled for generation when it is called like the model
    (``compiled(**tokenizer(text))``): its whole-sequence program takes what :func:`sequences` passed, and
    what the call leaves out is filled as generate() fills it: the attention mask all ones, position_ids each
    row's positions after its left padding, use_cache False (the KV cache is generate()'s)."""
    inputs = dict(zip(names, args, strict=False))
    if len(args) > len(names) or inputs.keys() & kwargs.keys():
        return args, kwargs  # forward()'s own TypeError names the argument
    inputs |= kwargs
    if inputs.get("use_cache"):
        raise InputError(
            "use_cache=True: a causal LM compiled for generation returns its logits alone, for whole sequences; "
            "its KV cache is generate()'s (compiled.generate(input_ids, attention_mask, max_new_tokens=...))"
        )
    ids = inputs.get("input_ids")
    if torch.is_tensor(ids) and ids.dim() == 2:
        if inputs.get("attention_mask") is None:
            inputs["attention_mask"] = torch.ones_like(ids)
        if "position_ids" in names and inputs.get("position_ids") is None:
            inputs["position_ids"] = positions(inputs["attention_mask"])
    if "use_cache" in names:
        inputs["use_cache"] = False
    return (), inputs


def prompt(
    sample: Sample, what: str, vocab: int | None, error: type[Exception] = CaptureError
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of a prompt: token ids [B, T] (or [T]) below ``vocab`` (where known), or a
    tokenizer's output (keyword arguments, or its mapping passed alone). ``what`` names the prompt in errors,
    which are ``error``s."""
    args, kwargs = sample
    if args and isinstance(args[0], Mapping):  # generate(tokenizer(...)): the mapping, not its unpacking
        args, kwargs = args[1:], {**args[0], **kwargs}
    ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() not in (1, 2):
        raise error(f"{what} must be token ids [batch, seq] or a tokenizer's output (input_ids)")
    ids = ids if ids.dim() == 2 else ids[None]
    if ids.numel() == 0:
        raise error(f"{what} has no tokens (input_ids {tuple(ids.shape)}): generation continues a prompt")
    # checked here: on the GPU the embedding's device-side assert would end the user's CUDA context
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        row, col = (((ids < 0) | (ids >= vocab)).nonzero()[0]).tolist()
        raise error(f"{what}: token id {int(ids[row, col])} (row {row}, position {col}) is outside the vocabulary "
                    f"of {vocab} ids")  # fmt: skip
    mask = torch.ones_like(ids) if mask is None else (mask if mask.dim() == 2 else mask[None])
    if mask.shape != ids.shape:
        raise error(f"{what}: attention_mask {tuple(mask.shape)} does not match input_ids")
    if (mask[:, -1] == 0).any():
        row = int((mask[:, -1] == 0).nonzero()[0])
        raise InputError(
            f"{what}, row {row}, ends in padding: generation appends to the right, so pad on the left "
            "(tokenizer.padding_side = 'left')"
        )
    return ids, mask.long()


def _vocab(step: torch.fx.GraphModule) -> int | None:
    """The rows of the embedding table the step looks ``input_ids`` up in (None: it reads them otherwise)."""
    ids = [n for n in step.graph.nodes if n.op == "placeholder" and n.target == "input_ids"]
    lookups = [u for n in ids for u in n.users if u.target is torch.ops.aten.embedding.default and u.args[1] is n]
    tables = [u.args[0] for u in lookups]
    return tables[0].meta["val"].shape[0] if len(tables) == 1 and "val" in tables[0].meta else None


def _kwargs(model: torch.nn.Module) -> dict:
    """Keyword arguments for a whole-sequence call: Hugging Face models must not build their own cache."""
    params = inspect.signature(model.forward).parameters
    missing = [name for name in SEQ_INPUTS if name not in params]
    if missing:
        raise CaptureError(
            f"generation needs a causal LM whose forward takes {', '.join(SEQ_INPUTS)} (a KV cache feeds it "
            f"the positions of new tokens); {type(model).__name__}.forward has no {', '.join(missing)}"
        )
    return {"use_cache": False} if "use_cache" in params else {}


def check_attention_span(model: torch.nn.Module, max_seq: int) -> None:
    """Refuse a model whose attention masks more than causality and padding within ``max_seq`` tokens, as its
    Hugging Face config declares it: the KV cache's one mask lets each token see every earlier one, so a
    sliding window (Mistral, Gemma 2/3's sliding layers, Qwen 2's with ``use_sliding_window``) or an attention
    chunk (Llama 4's) shorter than ``max_seq`` would go unheeded, and generation would silently part from the
    model's past it. Within ``max_seq`` tokens such a span masks nothing: exact."""
    config, name = getattr(model, "config", None), type(model).__name__
    spans = {  # a layer type -> the tokens it attends over, by its config (None: all earlier ones)
        "full_attention": None,
        "sliding_attention": getattr(config, "sliding_window", None),
        "chunked_attention": getattr(config, "attention_chunk_size", None),
    }
    types = getattr(config, "layer_types", None)
    if types is None:  # one window for every layer (Mistral), unless switched off (Qwen 2's use_sliding_window)
        on = spans["sliding_attention"] is not None and getattr(config, "use_sliding_window", True)
        types = ["sliding_attention" if on else "full_attention"]
    unknown = sorted(set(types) - set(spans))
    if unknown:
        raise OptionError(f"{name}'s layers attend as {unknown}: mpcompiler's KV cache attends causally only")
    too_short = sorted({t for t in types if isinstance(spans[t], int) and max_seq > spans[t]})
    if too_short:
        kind = too_short[0]
        count = f"{types.count(kind)} of its {len(types)} layers" if len(types) > 1 else "every layer"
        raise OptionError(
            f"{name} attends over a {kind.replace('_attention', '')} span of {spans[kind]} tokens ({count}, by its "
            f"config); mpcompiler's KV cache lets each token see every earlier one, which is that attention only "
            f"while a sequence fits in it: compile with max_seq <= {spans[kind]} (max_seq={max_seq})"
        )


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out["logits"] if "logits" in out else out[0]


def sequences(model: torch.nn.Module, prompts: list[Sample], new_tokens: int, max_seq: int) -> list[Sample]:
    """Each prompt continued by ``new_tokens`` of the fp32 model's greedy tokens (fewer where max_seq
    would be passed), as whole-sequence samples for calibration and accuracy."""
    out, extra, device = [], _kwargs(model), model_device(model)
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None  # Hugging Face's
    vocab = table.num_embeddings if isinstance(table, torch.nn.Embedding) else None
    with torch.no_grad():
        for index, sample in enumerate(prompts):
            ids, mask = prompt(sample, f"prompt {index}", vocab)
            ids, mask = ids.to(device), mask.to(device)
            if ids.shape[1] > max_seq:
                raise OptionError(f"prompt {index} has {ids.shape[1]} tokens, more than max_seq={max_seq}")
            for _ in range(min(new_tokens, max_seq - ids.shape[1])):
                logits = _logits(model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), **extra))
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            kwargs = {"input_ids": ids.cpu(), "attention_mask": mask.cpu(), "position_ids": positions(mask).cpu()}
            out.append(((), kwargs | extra))
    return out


def capture_example(sample: Sample) -> Sample:
    """A capture example with 2 rows: a size-1 batch cannot be captured as a dynamic dim."""
    args, kwargs = sample
    if kwargs["input_ids"].shape[0] > 1:
        return sample
    return args, {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


class Generator:
    """The generation program of a compiled causal LM: one prefill/decode step with a static KV cache
    (``insert_kv_cache`` on a copy of the planned graph), and the loop that chooses tokens."""

    def __init__(self, graph_module: torch.fx.GraphModule, lm: LMOptions, dump_dir=None, debug=False):
        self.lm = lm
        self.step = twin(graph_module, "MpGenerationStep")
        self.dump_dir = dump_dir / "generation" if dump_dir is not None else None
        self.debug = debug
        target = "fx-cuda" if model_device(self.step).type == "cuda" else "fx-cpu"
        passes = [InsertKvCache(**lm.__dict__), LowerFused(target=target)]
        self.runs = PassManager(passes, dump_dir=self.dump_dir, debug=debug).run(self.step)
        self.logits = output_names(graph_module).index("logits") if "logits" in output_names(graph_module) else 0
        self.extra = {"use_cache": False} if "use_cache" in self.step.graph._codegen.pytree_info.orig_args else {}
        self.vocab = _vocab(self.step)
        self._decode_steps = {}  # (rows, greedy) -> the decode step and its CUDA graph (None: off the GPU, or failed)
        self._prefill = {}  # causal -> the prompt step (under torch.compile on the GPU), built on first use
        self._prompt_graphs = {}  # (causal, input shapes) -> the prompt step's CUDA graph (None: it could not be)
        self._prompt_pool = torch.cuda.graph_pool_handle() if model_device(self.step).type == "cuda" else None

    def decode_graph(self, batch: int | None = None, *, greedy: bool = False) -> CudaGraphModule | None:
        """The decode step for ``batch`` rows (default: max_batch) as one CUDA graph, over the first
        :func:`graph_rows` rows of the cache (a graph per such size, captured on first use: a step costs
        what its rows cost, not the whole cache's). ``greedy``: the graph that chooses its next token and
        writes its own next inputs (:meth:`decode_step`). None where torch.compile or the capture fails (a
        warning names why; decode steps then run the FX program, slower)."""
        return self._decode(graph_rows(batch or self.lm.max_batch, self.lm.max_batch), greedy)[1]

    def _decode(self, rows: int, greedy: bool) -> tuple[torch.fx.GraphModule, CudaGraphModule | None]:
        """The decode step of ``rows`` rows (its FX program) and, on the GPU, its CUDA graph; built on first use."""
        if (rows, greedy) not in self._decode_steps:
            step, example = self.decode_step(rows, greedy=greedy)
            graph = None
            if model_device(step).type == "cuda":
                try:
                    with _decode_tuning(rows, model_device(step)):
                        folder = f"decode{rows}{'_greedy' if greedy else ''}"
                        dumps = self.dump_dir / folder / "cuda_graph" if self.dump_dir is not None else None
                        graph = CudaGraphModule(step, (), example | self.extra, dump_dir=dumps, debug=self.debug)
                except Exception as exc:  # a compiler bug must not stop generation (seen: dynamo in torch 2.11)
                    warnings.warn(
                        f"mpcompiler: the decode step could not be captured as a CUDA graph ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); decoding with the FX program instead",
                        stacklevel=4,
                    )
            self._decode_steps[rows, greedy] = (step, graph)
        return self._decode_steps[rows, greedy]

    def decode_step(self, rows: int, *, greedy: bool = False) -> tuple[torch.fx.GraphModule, dict[str, torch.Tensor]]:
        """The step over the cache's first ``rows`` rows as the decode graph compiles it
        (``passes/lower_decode_step.py``, dumped in the dump folder's ``generation/decode<rows>/``), and an
        example of its inputs: one new token a row, its warm-up writes in the cache's last slot (a prefill
        or decode step overwrites that slot before any step reads it). ``greedy``: the step also chooses its
        next token and writes its next inputs (``passes/carry_decode_state.py``, ``decode<rows>_greedy/``):
        it takes no tensor input, its state in the buffers that :func:`carry_decode_state.state` names."""
        device = model_device(self.step)
        example = {
            "input_ids": torch.zeros(rows, 1, dtype=torch.long, device=device),
            "attention_mask": torch.zeros(rows, self.lm.max_seq, dtype=torch.long, device=device),
            "position_ids": torch.zeros(rows, 1, dtype=torch.long, device=device),
            "cache_position": torch.tensor([self.lm.max_seq - 1], device=device),
        }
        step = twin(self.step, f"MpDecodeStep{rows}")
        folder = self.dump_dir / f"decode{rows}{'_greedy' if greedy else ''}" if self.dump_dir is not None else None
        passes = [LowerDecodeStep(example=example)] + ([CarryDecodeState(logits=self.logits)] if greedy else [])
        runs = PassManager(passes, dump_dir=folder, debug=self.debug).run(step)
        if not greedy:
            return step, example
        if not runs[-1].result.modified:
            raise CaptureError(f"the decode step cannot choose its own tokens: {runs[-1].result.reasons}")
        carry_decode_state.state(step)["cache_position"].fill_(self.lm.max_seq - 1)  # where warm-ups write
        return step, {}

    def prompt_step(self) -> torch.fx.GraphModule:
        """A new copy of the step for a prompt that fills an empty cache and has no padding
        (``passes/lower_prompt_step.py``, dumped in the dump folder's ``generation/prompt/``): its attention
        causal over its own keys and values, which it writes into the same cache; its logits the last
        position's alone, [B, 1, vocab]."""
        step = twin(self.step, "MpPromptStep")
        folder = self.dump_dir / "prompt" if self.dump_dir is not None else None
        PassManager([LowerPromptStep()], dump_dir=folder, debug=self.debug).run(step)
        return step

    @torch.no_grad()  # as the prompt step's CUDA graph captures it (no-grad: a guard of the compiled step)
    def __call__(self, input_ids, attention_mask, position_ids, cache_position, *, causal=False) -> torch.Tensor:
        """One step: the logits of the new tokens' last position, [B, vocab]. A decode step on the GPU
        replays the CUDA graph of its batch size, its rows padded to that graph's. ``causal``: the step is a
        prompt's, written at the cache's first slots (``cache_position`` 0..T-1) with no row padded
        (:meth:`prompt_step`, which reads neither the mask nor the cache: the caller vouches for both)."""
        batch = input_ids.shape[0]
        graph = (
            self.decode_graph(batch)
            if input_ids.shape[1] == 1 and input_ids.device.type == "cuda" and not causal
            else None
        )
        if graph is not None:
            pad = graph_rows(batch, self.lm.max_batch) - batch
            out = graph(
                input_ids=_pad_rows(input_ids, pad),
                attention_mask=_pad_rows(attention_mask, pad),
                position_ids=_pad_rows(position_ids, pad),
                cache_position=cache_position,
                **self.extra,
            )
            return torch.utils._pytree.tree_leaves(out)[self.logits][:batch, -1]
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      cache_position=cache_position, **self.extra)  # fmt: skip
        return torch.utils._pytree.tree_leaves(self._prompt_step(inputs, causal))[self.logits][:, -1].clone()

    def _prompt_step(self, inputs: dict, causal: bool):
        """A prefill (or a decode step off the GPU). On the GPU it runs Inductor's kernels, batch and
        length dynamic (compiled on the first call); an unpadded prompt's step (``causal``) replays the CUDA graph
        of its shape, captured on its first call (up to PROMPT_GRAPHS shapes, one memory pool): launched from
        Python, a 128-token prompt's ~240 kernels kept the GPU idle for most of its step (docs/llm.md). Where
        torch.compile fails, a warning names why and the FX program runs; where a capture fails, that shape
        runs compiled."""
        if causal not in self._prefill:
            program = self.prompt_step() if causal else self.step
            cuda = inputs["input_ids"].device.type == "cuda"
            self._prefill[causal] = (torch.compile(program, dynamic=True) if cuda else program, program)
        step, program = self._prefill[causal]
        shape = (causal, *(tuple(v.shape) for v in inputs.values() if isinstance(v, torch.Tensor)))
        # an unpadded prompt's step alone: its outputs are the last position's (each graph keeps its own)
        if causal and step is not program and shape not in self._prompt_graphs:
            if len(self._prompt_graphs) < PROMPT_GRAPHS:
                self._prompt_graphs[shape] = self._capture(step, inputs)
        graph = self._prompt_graphs.get(shape)
        if graph is not None:  # a replay computes this call's step, its first one too (the capture ran nothing)
            graph.load(**inputs)
            return graph.replay()
        try:
            return step(**inputs)
        except Exception as exc:  # a compiler bug must not stop generation; the step rewrites what it wrote
            if step is program:
                raise
            warnings.warn(
                f"mpcompiler: torch.compile failed on the prompt step ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); running the FX program instead",
                stacklevel=4,
            )
            self._prefill[causal] = (program, program)
            return program(**inputs)

    def _capture(self, step, inputs: dict) -> CudaGraphModule | None:
        """The compiled prompt ``step`` captured on copies of ``inputs`` (its warm-up runs the step on them: this
        prompt's keys and values, written again by the replay); None, with a warning, where it cannot be (that
        shape then runs compiled)."""
        try:
            return CudaGraphModule.of(step, inputs, self._prompt_pool)
        except Exception as exc:  # a capture that fails must leave generation running
            warnings.warn(
                f"mpcompiler: the prompt step could not be captured as a CUDA graph ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); it runs compiled",
                stacklevel=5,
            )
            return None

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        min_new_tokens: int = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        streamer=None,
    ) -> torch.Tensor:
        sample = ((input_ids,), {} if attention_mask is None else {"attention_mask": attention_mask})
        ids, mask = prompt(sample, "generate's prompt", self.vocab, InputError)
        batch, length = ids.shape
        if do_sample and not temperature > 0:
            raise InputError(f"temperature={temperature}: sampling divides the logits by it; pass a positive "
                             "temperature, or do_sample=False for greedy tokens")  # fmt: skip
        if do_sample and top_p is not None and not 0 <= top_p <= 1:
            raise InputError(f"top_p={top_p}: a probability mass, between 0 and 1")
        if not repetition_penalty > 0:
            raise InputError(f"repetition_penalty={repetition_penalty}: a seen token's logit is divided by it (or "
                             "multiplied, if negative); pass a positive number, 1.0 for none")  # fmt: skip
        if min_new_tokens < 0:
            raise InputError(f"min_new_tokens={min_new_tokens}: a count of tokens, 0 or more")
        if batch > self.lm.max_batch:
            raise InputError(f"a batch of {batch} prompts; the KV cache holds max_batch={self.lm.max_batch} rows")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens}: generate chooses at least one token")
        if length + max_new_tokens > self.lm.max_seq:
            raise InputError(
                f"{length} prompt tokens + max_new_tokens={max_new_tokens} = {length + max_new_tokens} passes "
                f"max_seq={self.lm.max_seq}, the KV cache's length"
            )
        device = model_device(self.step)
        # no row padded: the prompt step attends causally over the prompt alone (one token: the decode graph's step)
        causal = length > 1 and bool(mask.all())
        ids, mask = ids.to(device), mask.to(device)
        stops = torch.as_tensor([] if eos_token_id is None else eos_token_id, device=device).long().reshape(-1)
        # greedy: the decode graph chooses each token itself; sampling, streaming and the logits' rules (a
        # repetition penalty, stops held back by min_new_tokens) choose them here
        rules = (repetition_penalty, min_new_tokens if len(stops) else 0)
        greedy = not do_sample and streamer is None and len(stops) <= carry_decode_state.STOP_SLOTS and rules == (1, 0)
        rows = graph_rows(batch, self.lm.max_batch)
        if device.type == "cuda" or greedy:  # captured before the prefill: its warm-up writes stay out of it
            self._decode(rows, greedy)
        pad = pad_token_id if pad_token_id is not None else (int(stops[0]) if len(stops) else 0)
        slots = torch.zeros(batch, self.lm.max_seq, dtype=torch.long, device=device)
        slots[:, :length] = mask
        position = positions(mask)
        logits = self(ids, slots, position, torch.arange(length, device=device), causal=causal)
        if greedy:
            new = self._greedy(rows, logits.argmax(-1), slots, position[:, -1:] + 1, length, max_new_tokens, stops, pad)
        else:
            new = self._loop(logits, slots, position[:, -1:], length, max_new_tokens, stops, pad,
                             (do_sample, temperature, top_k, top_p, generator), rules, ids, streamer)  # fmt: skip
        if len(stops):  # cut the steps after every row has stopped
            stopped = torch.isin(new, stops)
            if bool(stopped.any(1).all()):
                new = new[:, : int(stopped.int().argmax(1).max()) + 1]
        return torch.cat([ids, new], 1)

    def _greedy(self, rows, token, slots, position, length, max_new_tokens, stops, pad) -> torch.Tensor:
        """The new tokens [B, max_new_tokens] of the decode step that chooses them itself (the greedy decode
        graph of ``rows`` rows, replayed back to back; the FX step off the GPU), from the prompt's ``token``.
        Whether every row has stopped is read every STOP_CHECK steps (each read waits for the GPU)."""
        step, graph = self._decode(rows, greedy=True)
        replay = graph.replay if graph is not None else functools.partial(step, **self.extra)
        state, batch, done = carry_decode_state.state(step), len(token), torch.isin(token, stops)
        for name, value in (("input_ids", token[:, None]), ("attention_mask", slots), ("position_ids", position),
                            ("done", done)):  # fmt: skip
            state[name].zero_()[:batch] = value  # the rows past the batch idle
        state["cache_position"].fill_(length)
        state["tokens"][:batch, length] = token
        state["stop_ids"].fill_(-1)[: len(stops)] = stops
        state["pad_id"].fill_(pad)
        count = 1
        while count < max_new_tokens:
            replay()
            count += 1
            if len(stops) and count % STOP_CHECK == 0 and bool(state["done"][:batch].all()):
                break
        return state["tokens"][:batch, length : length + count].clone()

    def _loop(self, logits, slots, last, length, max_new_tokens, stops, pad, choice, rules, ids, streamer):
        """The new tokens [B, max_new_tokens] chosen here from each step's logits (sampling, a streamer, the
        logits' ``rules``: repetition penalty, min_new_tokens), the first from the prompt's. The loop never
        waits for the GPU (no .item(), no host-to-device copy), so Python runs ahead and the steps' graph
        replays queue back to back; whether every row has stopped is read every STOP_CHECK steps. A streamer
        (transformers' TextStreamer, TextIteratorStreamer: put() and end()) gets the prompt, then each token
        as it is chosen; that reads every token back, so stops are read every step too."""
        check = STOP_CHECK if streamer is None else 1
        if streamer is not None:
            streamer.put(ids.cpu())
        new, cache_position = [], torch.full((1,), length, device=ids.device)
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        penalty, min_new = rules
        # the tokens a repetition penalty reads: the prompts' (their padding too, as Hugging Face's), then each chosen
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, True) if penalty != 1 else None
        for step in range(max_new_tokens):
            token = _choose(_processed(logits, seen, penalty, stops if step < min_new else None), *choice)
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            if len(stops):  # without eos tokens no row stops: a step launches no bookkeeping kernels for it
                token = torch.where(done, torch.full_like(token, pad), token)
                done |= torch.isin(token, stops)
            new.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
            if step + 1 == max_new_tokens or (len(stops) and step % check == 0 and bool(done.all())):
                break
            slots[:, length + step] = 1
            last = last + 1
            logits = self(token[:, None], slots, last, cache_position)
            cache_position = cache_position + 1
        if streamer is not None:
            streamer.end()
        return torch.stack(new, 1)


def _decode_tuning(rows: int, device: torch.device):
    """How Inductor compiles a decode graph. On Hopper, programmatic dependent launch (PDL) between its
    kernels: each launches while its predecessor runs and waits for its writes inside, so that a token's ~300
    kernels, most a few microseconds, do not each pay a launch and a tail (1-row generation 774.6 -> 863.4
    tokens/s, H100, 2026-12-07, docs/llm.md run AB). At one row, coordinate-descent tuning as gpt-fast
    compiles its decode step: Inductor writes each one-row matmul as a matrix-vector reduction (fp32
    accumulation) that it tunes and fuses with the norm, activation or residual beside it, where cuBLAS runs
    GEMM tiles 8 rows tall. One TinyLlama-shaped replay: 313 -> 266 kernels, 1.428 -> 1.318 ms (H100,
    2026-12-06, benchmarks/profile_llm.py; a whole 1-row generation 201.6 -> 185.6 ms). With 8 rows cuBLAS's
    GEMMs stay and the tuning measured 2% slower, so those graphs compile without it."""
    from torch._inductor import config

    patch = {}
    if PDL and hasattr(config.triton, "enable_pdl") and torch.cuda.get_device_capability(device) >= (9, 0):
        patch["triton.enable_pdl"] = True
    if rows == 1:
        # no in-place buffers: the o projection's kernel that added the residual stream in place (tuned with a
        # clone of that buffer inside each timed call) ran 1.4x to 2.6x its twin's time; without them a 1-row
        # generation's kernels took 161.4 ms, not 174.3 (H100, 2026-12-06, docs/llm.md run W)
        patch |= {"coordinate_descent_tuning": True, "inplace_buffers": False}
    return config.patch(patch)


def graph_rows(batch: int, max_batch: int) -> int:
    """The rows of the decode graph that runs a batch: the next power of two, at most max_batch (a few
    graphs serve every batch size; padding rows cost a memory-bound step little)."""
    return min(max_batch, 1 << (batch - 1).bit_length())


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with ``rows`` rows of zeros after it (idle rows: no token, no cache slot to see but their own)."""
    return torch.cat([x, x.new_zeros((rows, *x.shape[1:]))]) if rows else x


def _processed(logits, seen, penalty: float, held: torch.Tensor | None) -> torch.Tensor:
    """The logits after Hugging Face's processors that generate() takes, in its order: the repetition penalty
    (each ``seen`` token's logit divided by it, multiplied where negative), then ``held`` tokens (the stops
    before min_new_tokens) ruled out."""
    if seen is not None:
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    return logits.index_fill(-1, held, float("-inf")) if held is not None else logits


def _choose(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
    """The next token per row: the argmax, or a sample after temperature, top-k and top-p (in HF's order)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:  # top_k 0 or None: no top-k filter (as Hugging Face's)
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
