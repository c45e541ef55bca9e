"""The one generation entry point: ``generate(model, tokenizer, prompts, sampling, num_samples, stop, tools)``.

Eval, prompting baselines, preference-pair sampling, self-consistency, best-of-N, revise-and-retry and chat
all call ``generate``. It works on a ``ModernDecoderLM`` (``NativeBackend``, our ``KVCache``) and on any
Hugging Face causal LM (``HFCausalLMBackend``, HF's own cache) through the same four backend calls:
``prefill(prompts, max_len) -> (P, V)``, ``expand(n)``, ``keep_rows(rows)``, ``decode(tokens) -> (B, V)``
(plus ``vocab_size`` and ``eos_token_ids()``).

Design choices
- Different prompt lengths: ONE left-padded prefill. Padding slots are masked out (the dense cache publishes
  an attention mask, HF gets ``attention_mask``) and every row's positions start at 0 on its first real
  token, so a prompt's continuation is the same as when it is generated alone (tested).
- ``num_samples``: each prompt is prefilled once and the N samples decode together (row ``p * N + s`` is
  sample ``s`` of prompt ``p``). On a ModernDecoderLM (eager decode) the N rows share the prompt's keys and
  values (``SharedPrefixKVCache``: the prompt is read once per step, not N times); HF models repeat the cache.
- Randomness: every (prompt, sample) row has its own generator seeded from ``(seed, p, s)``, see
  ``modern_llm.inference.sampling``: same seed -> same outputs, and sample s does not depend on N or batching.
- Finished rows are dropped from the batch (``keep_rows``) once they are an eighth of it, so a long tail
  does not pay for finished samples and the cache is not copied at every single finish.
- Stop conditions, checked after every token: an EOS id -> "eos" (the id is kept in ``token_ids``, not in
  ``text``); a stop string -> "stop" (``text`` is cut before the earliest stop string; ``token_ids`` keep the
  tokens up to the one that completed it); ``max_new_tokens`` -> "length". Stop strings are matched on text
  decoded WITH special tokens, so "<|end|>" works as a stop string.
- Tools: after each token of a row whose forced queue is empty, ``tools(generated_text)`` is called; a
  non-None return is tokenized and queued. Queued tokens replace the sampled token one per step, i.e. they
  are teacher-forced through the model exactly like sampled ones, so the KV cache stays consistent.
  They count towards ``max_new_tokens`` and are flagged in ``tool_token_mask``.
- ``logprobs=True`` records log p(token) under the model's own distribution (raw logits, temperature 1,
  no filtering) — the quantity rerankers and verifiers want — for sampled and forced tokens alike.
- ``stream=True`` returns a generator of ``StreamEvent`` text deltas. Deltas hold back a trailing partial
  UTF-8 character and any suffix that could begin a stop string, so the concatenated deltas of a row equal
  its final ``text`` exactly.
- ``decode_mode``: "eager" (default, CPU and GPU). For a ModernDecoderLM, "static" runs the fixed-shape
  decode step (``modern_llm.inference.kv_cache.StaticDecodeStep``) without capture, and on CUDA
  "cuda_graph" / "compile" capture it; finished rows then stay in the batch (fed a dummy token), since a
  captured graph has fixed shapes. The capture modes could not be run on the CPU-only development machine;
  "static" checks the same code path against "eager" in the tests.

Footguns
- The model is switched to eval mode for the duration of the call (dropout and MoE capacity dropping would
  otherwise make cached decoding differ from a full forward) and restored afterwards.
- Text prompts are tokenized with ``add_special_tokens=True`` (Llama adds its BOS; our tokenizers add nothing).
  Pass token-id lists (e.g. from ``apply_chat_template``) to control this exactly.
- Tool insertions are tokenized on their own, which may split differently from how the model would have
  written the same text; that is inherent to forced insertion.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modern_llm.inference.kv_cache import KVCache, SharedPrefixKVCache, StaticDecodeStep
from modern_llm.inference.sampling import SamplingParams, make_generators, select_next_tokens

ToolFn = Callable[[str], "str | None"]
FINISH_REASONS = ("eos", "stop", "length")
# "eager": dynamic shapes, finished rows dropped; "static": the fixed-shape step run eagerly (CPU-testable);
# "cuda_graph" / "compile": the fixed-shape step captured on CUDA.
DECODE_MODES = ("eager", "static", "cuda_graph", "compile")
# Drop finished rows once they are >= 1/COMPACT_FRACTION of the batch: every drop copies the live KV cache,
# and dropping at each finish (hundreds of samples ending one by one) made those copies dominate decode.
COMPACT_FRACTION = 8
BACKEND_API = ("prefill", "expand", "keep_rows", "decode", "vocab_size", "eos_token_ids")


@dataclass
class GenerationResult:
    """One generated sample of one prompt."""

    prompt_index: int
    sample_index: int
    text: str  # generated text only (no prompt), cut before a stop string, without the EOS token
    token_ids: list[int]  # generated ids, including the EOS / stop-completing token
    num_generated_tokens: int
    finish_reason: str  # "eos" | "stop" | "length"
    stop_string: str | None = None  # which stop string ended it
    logprobs: list[float] | None = None  # per token of token_ids, when requested
    tool_token_mask: list[bool] = field(default_factory=list)  # True where a tool inserted the token

    @property
    def num_tool_tokens(self) -> int:
        return sum(self.tool_token_mask)


@dataclass
class StreamEvent:
    """New text of one row since its previous event; the last event of a row carries its result."""

    prompt_index: int
    sample_index: int
    text: str
    token_id: int | None
    finished: bool = False
    result: GenerationResult | None = None


# ------------------------------------------------------------------------------------------- backends


class NativeBackend:
    """Engine backend for ``ModernDecoderLM`` on our preallocated ``KVCache``."""

    def __init__(self, model: torch.nn.Module, decode_mode: str = "eager", share_prefix: bool = True):
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        self.model, self.decode_mode = model, decode_mode
        # False: expand() copies the prompt's K/V into every sample's row (the bench's baseline)
        self.share_prefix = share_prefix
        self.cache: KVCache | SharedPrefixKVCache | None = None
        self.max_len = 0
        self.next_pos: torch.Tensor | None = None  # (B,)
        self._static: StaticDecodeStep | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def supports_compaction(self) -> bool:
        return self.decode_mode == "eager"

    def eos_token_ids(self) -> set[int]:
        return set()

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], max_len: int) -> torch.Tensor:
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        T = int(lengths.max())
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        pad = torch.arange(T, device=self.device)[None, :] < (T - lengths)[:, None]  # (P, T) True = padding
        self.cache = KVCache.for_model(self.model, len(prompts), max_len)
        self.max_len = max_len
        positions = None  # no padding: plain 0..T-1 and the fused causal kernels
        if pad.any():
            self.cache.mark_padding(pad)
            positions = (torch.arange(T, device=self.device)[None, :] - (T - lengths)[:, None]).clamp(min=0)
        logits = self.model(ids, positions=positions, kv_cache=self.cache).logits  # (P, T, V)
        self.next_pos = lengths.clone()
        return logits[:, -1].float()

    def expand(self, n: int) -> None:
        if n > 1 and self.share_prefix and self.decode_mode == "eager":  # fixed shapes need dense rows
            self.cache = SharedPrefixKVCache(self.cache, n, self.max_len - self.cache.length)
        else:
            self.cache.expand(n)
        self.next_pos = self.next_pos.repeat_interleave(n, dim=0)

    def keep_rows(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        self.cache.keep_rows(rows)
        self.next_pos = self.next_pos.index_select(0, rows)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        if self.decode_mode != "eager":
            if self._static is None:
                step_mode = "eager" if self.decode_mode == "static" else self.decode_mode
                self._static = StaticDecodeStep(self.model, self.cache, step_mode)
            logits = self._static(tokens, self.next_pos)
        else:
            out = self.model(tokens.view(-1, 1), positions=self.next_pos[:, None], kv_cache=self.cache)
            logits = out.logits[:, -1]
        self.next_pos = self.next_pos + 1
        return logits.float()


def as_backend(model: Any, decode_mode: str = "eager"):
    """Wrap ``model`` (ModernDecoderLM, HF causal LM, or an object that already is a backend)."""
    from modern_llm.models.transformer import ModernDecoderLM

    if isinstance(model, ModernDecoderLM):
        return NativeBackend(model, decode_mode)
    if all(hasattr(model, name) for name in BACKEND_API):
        return model
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        PreTrainedModel = ()  # noqa: N806
    if isinstance(model, PreTrainedModel):
        if decode_mode != "eager":
            raise ValueError("decode_mode other than 'eager' is only implemented for ModernDecoderLM")
        from modern_llm.inference.hf_adapter import HFCausalLMBackend

        return HFCausalLMBackend(model)
    raise ValueError(
        f"generate() got a {type(model).__name__}; pass a ModernDecoderLM, a transformers causal LM or a "
        f"backend with {'/'.join(BACKEND_API)}"
    )


# ------------------------------------------------------------------------------------------- row state


@dataclass
class _Row:
    prompt_index: int
    sample_index: int
    ids: list[int] = field(default_factory=list)
    tool_mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forced: deque[int] = field(default_factory=deque)
    text: str = ""  # decoded generated text (with special tokens), updated after each token
    emitted: str = ""  # what stream events have delivered so far
    result: GenerationResult | None = None


def _streamable_length(text: str, stops: Sequence[str]) -> int:
    """Length of the prefix of ``text`` that can no longer change or turn into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":  # incomplete UTF-8 sequence from a byte-level token
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:k], 0, end):
                hold = max(hold, k)
                break
    return end - hold


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    hits = [(i, s) for s in stops if (i := text.find(s)) != -1]
    return min(hits) if hits else None


# ------------------------------------------------------------------------------------------- input checks


def _encode_prompts(tokenizer, prompts) -> list[list[int]]:
    if isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
    ):
        prompts = [prompts]  # one prompt (text or token ids)
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or token-id lists")
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"prompts[{i}] is text but tokenizer=None; pass a tokenizer or token ids")
            ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(
                f"prompts[{i}] encodes to zero tokens; the model needs at least one (e.g. start with BOS)"
            )
        encoded.append(ids)
    return encoded


def _check_args(tokenizer, num_samples, stop, tools) -> list[str]:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    if stops and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the generated text")
    if tools is not None and not callable(tools):
        raise ValueError(
            f"tools must be a callable text -> str | None (e.g. calculator_completion), got {tools!r}"
        )
    if tools is not None and tokenizer is None:
        raise ValueError("tools need a tokenizer (to read generated text and encode insertions)")
    return stops


def _check_token_range(prompt_ids: list[list[int]], vocab_size: int) -> None:
    for i, ids in enumerate(prompt_ids):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompts[{i}] has token ids {bad[:5]} outside the model's vocabulary [0, {vocab_size}); "
                "was it encoded with a different tokenizer?"
            )


def _eos_ids(backend, tokenizer, eos_token_id, ignore_eos: bool) -> set[int]:
    if ignore_eos:
        return set()
    if eos_token_id is not None:
        return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}
    ids = set(backend.eos_token_ids())
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


# ------------------------------------------------------------------------------------------- the loop


def generate(
    model,
    tokenizer,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    sampling: SamplingParams | None = None,
    num_samples: int = 1,
    stop: str | Sequence[str] | None = None,
    tools: ToolFn | None = None,
    max_new_tokens: int | None = None,
    stream: bool = False,
    *,
    logprobs: bool = False,
    eos_token_id: int | Sequence[int] | None = None,
    ignore_eos: bool = False,
    decode_mode: str = "eager",
) -> list[list[GenerationResult]] | Iterator[StreamEvent]:
    """Generate ``num_samples`` continuations of each prompt.

    Returns ``results[p][s]`` (prompt p, sample s) as ``GenerationResult``; with ``stream=True`` returns an
    iterator of ``StreamEvent`` whose final event per row carries the result. ``max_new_tokens`` overrides
    ``sampling.max_new_tokens``. ``eos_token_id`` overrides the tokenizer's/model's EOS ids (e.g. the chat end
    token); ``ignore_eos`` disables EOS stopping (benchmarks).
    """
    params = sampling or SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams, got {type(params).__name__}")
    if max_new_tokens is not None:
        params = dataclasses.replace(params, max_new_tokens=max_new_tokens)  # re-validated
    stops = _check_args(tokenizer, num_samples, stop, tools)
    prompt_ids = _encode_prompts(tokenizer, prompts)
    backend = as_backend(model, decode_mode)
    _check_token_range(prompt_ids, backend.vocab_size)
    eos = _eos_ids(backend, tokenizer, eos_token_id, ignore_eos)
    events = _generation_events(
        backend, tokenizer, prompt_ids, params, num_samples, stops, tools, eos, logprobs, stream
    )
    if stream:
        return events
    results: list[list[GenerationResult | None]] = [[None] * num_samples for _ in prompt_ids]
    for event in events:
        if event.finished:
            results[event.prompt_index][event.sample_index] = event.result
    return results  # type: ignore[return-value]


def _generation_events(
    backend,
    tokenizer,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    num_samples: int,
    stops: list[str],
    tools: ToolFn | None,
    eos: set[int],
    want_logprobs: bool,
    stream: bool,
) -> Iterator[StreamEvent]:
    module = getattr(backend, "model", None)
    was_training = bool(getattr(module, "training", False))
    if module is not None:
        module.eval()
    try:
        yield from _decode_loop(
            backend, tokenizer, prompt_ids, params, num_samples, stops, tools, eos, want_logprobs, stream
        )
    finally:
        if module is not None and was_training:
            module.train()


def _decode_loop(
    backend, tokenizer, prompt_ids, params, num_samples, stops, tools, eos, want_logprobs, stream
):
    max_len = max(len(p) for p in prompt_ids) + params.max_new_tokens
    logits = backend.prefill(prompt_ids, max_len)  # (P, V): one forward over all prompts
    if num_samples > 1:
        backend.expand(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)  # (P*N, V)
    rows = [_Row(p, s) for p in range(len(prompt_ids)) for s in range(num_samples)]
    generators = make_generators(params.seed, [(r.prompt_index, r.sample_index) for r in rows])
    seen = _context_mask(prompt_ids, num_samples, logits.shape[-1], logits.device, params)
    active = list(range(len(rows)))  # rows still generating, in backend batch order
    compact = getattr(backend, "supports_compaction", True)
    for _ in range(params.max_new_tokens):
        idx = torch.tensor(active, device=logits.device)
        tokens = select_next_tokens(
            logits, params, [generators[i] for i in active], None if seen is None else seen[idx]
        )
        forced = torch.zeros(len(active), dtype=torch.bool)
        for j, i in enumerate(active):
            if rows[i].forced:
                tokens[j] = rows[i].forced.popleft()
                forced[j] = True
        token_lp = None
        if want_logprobs:
            token_lp = logits.log_softmax(-1).gather(-1, tokens[:, None].to(logits.device))[:, 0].tolist()
        if seen is not None:
            seen[idx, tokens.to(seen.device)] = True
        token_list = tokens.tolist()
        still = []
        for j, i in enumerate(active):
            if rows[i].result is not None:  # finished earlier, still in the batch until the next compaction
                continue
            lp = None if token_lp is None else token_lp[j]
            event = _advance_row(
                rows[i], token_list[j], bool(forced[j]), lp, tokenizer, params, stops, tools, eos
            )
            if stream or event.finished:
                yield event
            if rows[i].result is None:
                still.append(j)
        if not still:
            return
        if compact and (len(active) - len(still)) * COMPACT_FRACTION >= len(active):
            keep = torch.tensor(still)
            backend.keep_rows(keep)
            active = [active[j] for j in still]
            tokens = tokens[keep]
        logits = backend.decode(tokens)
    # unreachable: every row hits max_new_tokens inside the loop


def _context_mask(prompt_ids, num_samples, vocab, device, params) -> torch.Tensor | None:
    """(P*N, V) bool of tokens in each row's context, for the repetition penalty (None when it is off)."""
    if params.repetition_penalty == 1.0:
        return None
    seen = torch.zeros(len(prompt_ids), vocab, dtype=torch.bool, device=device)
    for p, ids in enumerate(prompt_ids):
        seen[p, torch.tensor(ids, device=device)] = True
    return seen.repeat_interleave(num_samples, dim=0)


def _advance_row(
    row: _Row,
    token: int,
    forced: bool,
    logprob: float | None,
    tokenizer,
    params: SamplingParams,
    stops: list[str],
    tools: ToolFn | None,
    eos: set[int],
) -> StreamEvent:
    """Append one token to ``row``, apply stop rules and the tool hook; return the stream event, if any."""
    row.ids.append(token)
    row.tool_mask.append(forced)
    if logprob is not None:
        row.logprobs.append(logprob)
    finish, final_text, stop_string = None, None, None
    if token in eos and not forced:
        finish = "eos"
        final_text = tokenizer.decode(row.ids[:-1], skip_special_tokens=False) if tokenizer else ""
    else:
        row.text = tokenizer.decode(row.ids, skip_special_tokens=False) if tokenizer else ""
        hit = _first_stop(row.text, stops) if stops else None
        if hit is not None:
            finish, final_text, stop_string = "stop", row.text[: hit[0]], hit[1]
        elif len(row.ids) >= params.max_new_tokens:
            finish, final_text = "length", row.text
        elif tools is not None and not row.forced:
            insertion = tools(row.text)
            if insertion:
                row.forced.extend(tokenizer.encode(insertion, add_special_tokens=False))
    if finish is not None:
        row.result = GenerationResult(
            prompt_index=row.prompt_index,
            sample_index=row.sample_index,
            text=final_text,
            token_ids=list(row.ids),
            num_generated_tokens=len(row.ids),
            finish_reason=finish,
            stop_string=stop_string,
            logprobs=list(row.logprobs) if logprob is not None else None,
            tool_token_mask=list(row.tool_mask),
        )
        delta = final_text[len(row.emitted) :] if final_text.startswith(row.emitted) else ""
        return StreamEvent(row.prompt_index, row.sample_index, delta, token, True, row.result)
    visible = row.text[: _streamable_length(row.text, stops)]
    delta = visible[len(row.emitted) :] if visible.startswith(row.emitted) else ""
    row.emitted += delta
    return StreamEvent(row.prompt_index, row.sample_index, delta, token, False, None)
