"""Preference pairs (prompt, chosen, rejected): sampled on-policy for math tasks, or read from JSONL files.

1. On-policy math pairs (``sample_solutions`` + ``build_math_pairs``): the policy (usually the SFT model)
   writes N solutions per question through the one engine (``inference.generate`` with ``num_samples=N``,
   each prompt prefilled once); the task's own answer checker (``task.is_correct``) labels them; each
   question with at least one correct and one incorrect solution gives pairs chosen = correct,
   rejected = incorrect. The same labelled samples are the verifier's training data. With ``gold`` (the
   dataset's reference solutions), a question whose samples are all wrong still gives pairs: chosen = the
   reference solution, rejected = a wrong sample (the "real vs generated" pairs of SPIN; Chen et al., 2024,
   "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models"). A weak policy that
   solves almost nothing (SmolLM2-135M on GSM8K train: 1% of samples) otherwise yields a handful of pairs.
2. Chosen/rejected JSONL (``load_preference_jsonl``, ``.jsonl`` or ``.jsonl.gz``), one pair per line in any
   of these shapes (detected per row):
   - HH-RLHF: ``{"chosen": str, "rejected": str}``, whole "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts.
     The prompt is their longest common prefix cut back to the end of its last "\\n\\nAssistant:" marker; the
     rest of each transcript is the completion.
   - UltraFeedback (binarized): ``{"prompt": str, "chosen": [messages], "rejected": [messages]}``; the
     last message of each list is the assistant's answer, the messages before it are the prompt.
   - Explicit: ``{"prompt": str | [messages], "chosen": str | [assistant message], "rejected": ...}``
     (TRL's standard and conversational forms; the files ``save_preference_jsonl`` writes).

Design choices
- A pair's prompt is either rendered text (on-policy pairs keep exactly the prompt the policy saw) or a
  list of chat messages, rendered at encoding time with the tokenizer's chat template (``chat=True``) or as
  an HH-style "Human:/Assistant:" transcript (``chat=False``), so one file trains chat and plain models.
- Completions are stored as text and re-encoded with the SFT collator (completion + EOS), i.e. chosen and
  rejected end exactly like SFT targets. A sample that hit ``max_new_tokens`` therefore gets an EOS it
  never produced; ``build_math_pairs`` skips truncated samples as chosen for that reason.
- Pair selection is seeded and deterministic: per question, up to ``max_pairs_per_question`` distinct
  (correct, incorrect) texts, preferring distinct chosen and rejected texts.

Footguns
- HH-RLHF rows where one transcript continues with extra turns (a few rows do: the model wrote "Human:"
  itself) are read as written: the extra turns are part of that completion.
- Malformed rows raise ValueError naming file and line; empty completions (4 rows of harmless-base test)
  are legal data and kept.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ASSISTANT = "\n\nAssistant:"
_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PreferencePair:
    prompt: str | Messages  # rendered prompt text, or chat messages (rendered at encoding time)
    chosen: str  # preferred completion (assistant text, no end-of-turn token)
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "meta": self.meta}


# ----------------------------------------------------------------------------------------------- JSONL


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def parse_hh_transcript(text: str, where: str) -> Messages:
    """ "\\n\\nHuman: a\\n\\nAssistant: b" -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError(f"{where}: transcript must start with '\\n\\nHuman:', got {text[:40]!r}")
    return [{"role": _ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]


def split_hh_pair(chosen: str, rejected: str, where: str) -> tuple[Messages, str, str]:
    """(prompt messages, chosen completion, rejected completion) of two HH-RLHF transcripts."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(_HH_ASSISTANT, 0, common)  # last marker lying entirely inside the shared prefix
    if cut == -1:
        raise ValueError(
            f"{where}: chosen and rejected share no '\\n\\nHuman: ...\\n\\nAssistant:' prefix; an HH-RLHF row "
            "must be two transcripts that differ only after an Assistant marker"
        )
    end = cut + len(_HH_ASSISTANT)
    prompt_messages = parse_hh_transcript(chosen[:cut], where)
    if not prompt_messages or prompt_messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the shared prompt must end with a Human turn before the Assistant marker")
    return prompt_messages, chosen[end:].lstrip(" "), rejected[end:].lstrip(" ")


def _check_messages(value: Any, key: str, where: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: '{key}' must be a non-empty list of {{'role','content'}} messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(
                f"{where}: '{key}'[{i}] must be a dict with string 'role' and 'content', got {m!r}"
            )
    return value


def _assistant_text(messages: Messages, key: str, where: str) -> str:
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message of '{key}' must have role 'assistant'")
    return messages[-1]["content"]


def pair_from_row(row: Any, where: str) -> PreferencePair:
    """One JSONL row in any supported shape (see module docstring) -> PreferencePair."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; a pair needs 'chosen' and 'rejected'")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    if prompt is None:
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise ValueError(
                f"{where}: without 'prompt', 'chosen' and 'rejected' must be HH-RLHF transcript strings"
            )
        messages, c, r = split_hh_pair(chosen, rejected, where)
        return PreferencePair(messages, c, r, meta)
    if isinstance(chosen, str) and isinstance(rejected, str):
        if isinstance(prompt, list):
            prompt = _check_messages(prompt, "prompt", where)
        elif not isinstance(prompt, str):
            raise ValueError(f"{where}: 'prompt' must be a string or a list of messages")
        return PreferencePair(prompt, chosen, rejected, meta)
    chosen_m = _check_messages(chosen, "chosen", where)
    rejected_m = _check_messages(rejected, "rejected", where)
    c, r = _assistant_text(chosen_m, "chosen", where), _assistant_text(rejected_m, "rejected", where)
    if isinstance(prompt, list):  # TRL conversational: the lists hold only the answer
        return PreferencePair(_check_messages(prompt, "prompt", where), c, r, meta)
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string or a list of messages")
    if chosen_m[:-1] != rejected_m[:-1]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' must share every message but the last")
    prompt_messages = chosen_m[:-1] or [{"role": "user", "content": prompt}]
    return PreferencePair(prompt_messages, c, r, meta)


def load_preference_jsonl(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    """Pairs from a ``.jsonl``/``.jsonl.gz`` file (first ``limit`` rows); errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference file not found: {path}")
    pairs: list[PreferencePair] = []
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(pairs) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
            pairs.append(pair_from_row(row, where))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs found (empty file?)")
    return pairs


def save_preference_jsonl(pairs: Sequence[PreferencePair], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair.to_json(), ensure_ascii=False) + "\n")
    return path


def render_prompt(prompt: str | Messages, tokenizer: Any, chat: bool) -> str:
    """A pair's prompt as text: chat template (+ generation prompt), or an HH-style transcript ending in
    "\\n\\nAssistant:" when ``chat`` is false. Text prompts pass through unchanged."""
    if isinstance(prompt, str):
        return prompt
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat=True but the tokenizer has no chat template; use chat=False (HH transcript)"
            )
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    turns = "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt)
    return turns + _HH_ASSISTANT


def completion_text(text: str, prompt: str | Messages, chat: bool) -> str:
    """Plain transcripts put a space after "Assistant:"; chat templates take the bare answer."""
    return text if chat or isinstance(prompt, str) else f" {text}"


# ----------------------------------------------------------------------------------------------- on-policy


@dataclass
class Sample:
    text: str
    answer: Any  # the task's extracted answer (None when unparseable)
    correct: bool
    finish_reason: str
    steps_ok: bool | None = (
        None  # task.steps_valid(text): every arithmetic step right (None: nothing checked)
    )

    def is_good(self, strict: bool = False) -> bool:
        """Correct final answer; with ``strict`` also no wrong arithmetic step (no lucky guesses)."""
        return self.correct and not (strict and self.steps_ok is False)


def prompt_token_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt ids exactly as the SFT collator encodes them (BOS handling included)."""
    from modern_llm.data.task_datasets import CausalLMCollator

    collator = CausalLMCollator(tokenizer, max_length=1 << 30, add_eos=False)
    return [collator.encode(p, "")[0] for p in prompts]


def sample_solutions(
    model: Any,
    tokenizer: Any,
    task: Any,
    examples: Sequence[Any],
    prompts: Sequence[str],
    num_samples: int,
    sampling: Any,
    stop_ids: Sequence[int],
    batch_prompts: int = 32,
) -> list[list[Sample]]:
    """``num_samples`` completions per prompt through the engine, graded by ``task`` -> samples[q][s]."""
    from modern_llm.inference.engine import generate

    if len(prompts) != len(examples):
        raise ValueError(f"{len(prompts)} prompts for {len(examples)} examples")
    ids = prompt_token_ids(tokenizer, prompts)
    out: list[list[Sample]] = []
    for start in range(0, len(ids), batch_prompts):
        chunk = ids[start : start + batch_prompts]
        results = generate(
            model,
            tokenizer,
            chunk,
            sampling=sampling,
            num_samples=num_samples,
            stop=list(task.stop_sequences) or None,
            eos_token_id=list(stop_ids),
        )
        for offset, row in enumerate(results):
            example = examples[start + offset]
            out.append([_graded(task, example, r) for r in row])
        log.info("sampled %d/%d prompts x %d", len(out), len(ids), num_samples)  # progress of long runs
    return out


def _graded(task: Any, example: Any, result: Any) -> Sample:
    answer = task.extract_answer(result.text)
    steps_valid = getattr(task, "steps_valid", None)
    return Sample(
        result.text,
        answer,
        bool(task.is_correct(result.text, example)),
        result.finish_reason,
        None if steps_valid is None else steps_valid(result.text),
    )


@dataclass
class PairStats:
    n_questions: int
    n_with_pair: int  # questions with >= 1 correct and >= 1 incorrect sample
    n_all_correct: int
    n_all_wrong: int
    n_pairs: int
    sample_accuracy: float  # fraction of all samples that are correct
    n_gold_pairs: int = 0  # pairs whose chosen is the reference solution (``gold`` fallback)

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def build_math_pairs(
    prompts: Sequence[str],
    samples: Sequence[Sequence[Sample]],
    max_pairs_per_question: int = 2,
    seed: int = 0,
    strict: bool = False,
    gold: Sequence[str] | None = None,
) -> tuple[list[PreferencePair], PairStats]:
    """chosen = a correct sample, rejected = an incorrect one, per question; see module docstring.

    ``strict``: chosen must also have no wrong arithmetic step (``Sample.is_good``); a correct answer
    reached by wrong steps is then neither chosen nor rejected. ``gold`` (one reference solution per
    prompt): questions without a good sample use it as the chosen side (pair meta ``"chosen": "gold"``).
    """
    if max_pairs_per_question < 1:
        raise ValueError(f"max_pairs_per_question must be >= 1, got {max_pairs_per_question}")
    if gold is not None and len(gold) != len(prompts):
        raise ValueError(f"{len(gold)} gold solutions for {len(prompts)} prompts; pass one per prompt")
    rng = random.Random(seed)
    pairs: list[PreferencePair] = []
    with_pair = all_correct = all_wrong = n_correct = n_total = n_gold = 0
    for q, (prompt, row) in enumerate(zip(prompts, samples)):
        n_total += len(row)
        n_correct += sum(s.correct for s in row)
        good = _distinct([s.text for s in row if s.is_good(strict) and s.finish_reason != "length"])
        bad = _distinct([s.text for s in row if not s.correct])
        if not any(s.correct for s in row):
            all_wrong += 1
        elif all(s.correct for s in row):
            all_correct += 1
        meta: dict[str, Any] = {"question": q}
        if not good and bad and gold is not None:
            good, meta = [gold[q]], {"question": q, "chosen": "gold"}
        if not good or not bad:
            continue
        with_pair += 1
        rng.shuffle(good)
        rng.shuffle(bad)
        n = min(max_pairs_per_question, max(len(good), len(bad)))
        n_gold += n if "chosen" in meta else 0
        for k in range(n):
            pairs.append(PreferencePair(prompt, good[k % len(good)], bad[k % len(bad)], dict(meta)))
    stats = PairStats(
        len(prompts), with_pair, all_correct, all_wrong, len(pairs), n_correct / max(n_total, 1), n_gold
    )
    return pairs, stats


def _distinct(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))
