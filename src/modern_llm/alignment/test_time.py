"""Test-time compute: spend more inference on a question and pick a better answer.

    modern-llm test-time --config configs/test_time/arithmetic_scratch.yaml [--n_questions 20 ...]

What is here, all on samples from the ONE engine (``inference.generate`` with ``num_samples``: each prompt is
prefilled once, its N samples decode as one batch):
- Self-consistency: N sampled solutions, answers extracted by the task's own extractor, majority vote
  (``metrics.majority_vote``; ties go to the earliest sample) and verifier-weighted vote
  (``metrics.weighted_vote`` with P(correct) weights).
- Best-of-N: the sample with the highest verifier score (first sample wins ties).
- Oracle ``pass@N`` with the unbiased estimator (``metrics.pass_at_k(n_max, c, N)``), always reported beside
  majority and verifier@N: the ceiling any reranker of N samples could reach.
- Revise-and-retry: when the score of the chosen attempt is below a threshold, re-prompt with the previous
  attempt and a revision instruction, up to ``rounds`` times; counts triggers, fixes (wrong -> right) and
  breaks (right -> wrong).
- The calculator tool (``tools=calculator_completion``): GSM8K-style ``<<expr=`` spans get their exact result
  force-inserted; on/off comparison plus the rate of wrong ``<<expr=result>>`` annotations.
- Structured outputs: a strict parser of the fixed final-answer formats (``#### <number>`` or "The answer
  is <number>"); its failures are reported as the format-violation rate (the task's lenient extractor, which
  falls back to the last number, is what grading uses).
- ``accuracy_vs_n``: from ONE set of ``n_max`` samples per question, accuracy for N in e.g. {1,..,32} of
  greedy, majority, verifier best-of-N, verifier-weighted vote and oracle pass@N, with the generated tokens
  spent (the compute axis).

Design choices
- Scores come from any ``score(question, solution) -> float`` callable (``question`` = the rendered prompt the
  policy saw, since that is what the verifier was trained on). A scorer may also offer
  ``score_batch(questions, solutions)`` for speed; ``VerifierScorer`` wraps the trained verifier
  (``training.train_verifier.score_solutions``) that way. Tests pass plain Python functions.
- When no verifier exists (e.g. SmolLM2 here) ``agreement_scorer`` gives a training-free confidence: the
  fraction of the question's own N samples that share the attempt's answer (self-consistency confidence).
  It drives revise-and-retry only; verifier columns are then omitted, never faked.
- Subsampling for smaller N: for question q and draw d a permutation of the n_max samples is drawn from a
  generator seeded with (seed, q, d); the subset for N is its first N indices, kept in the original sample
  order (so ties break the same way as on the full set, and N = n_max is exactly the full set). Subsets are
  nested across N within a draw. Metrics are averaged over ``n_draws`` draws (one draw at N = n_max).
- Oracle pass@N uses all n_max samples through the unbiased estimator, not the subsets.
- Compute = generated tokens per question (sampled + tool-inserted tokens). Prompt tokens are left out: the
  prompt is prefilled once whatever N is (see ``bench/sampling_cost.py`` for the wall-clock cost of N).
- Revision acceptance: a revised attempt replaces the current one only if its score is higher ("keep the
  better-scored attempt"), so a good verifier cannot be talked into a worse answer; the revision is scored
  against the ORIGINAL prompt. ``num_samples`` revision candidates per trigger are sampled in one batch and
  the best-scored one competes.

Footguns
- Weighted vote needs non-negative weights: use probabilities (the verifier's P(correct)), not logits.
- With a scratch model trained on single-turn data the revision prompt (a second user turn) is
  out-of-distribution; a "revision" then mostly acts as a fresh sample. Reported as measured.
- A sample cut by ``max_new_tokens`` is still graded (usually wrong: no final answer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modern_llm.config.base import config_to_dict, parse_config_cli
from modern_llm.evaluation import metrics
from modern_llm.training.train_sft import ScratchConfig, TaskDataConfig

log = logging.getLogger(__name__)

ScoreFn = Callable[[str, str], float]

REVISION_INSTRUCTION = (
    "Your previous solution may contain a mistake. Check every step, then write a corrected solution "
    "ending with '#### <number>'."
)
CURVE_METHODS = ("majority", "verifier_best_of_n", "verifier_weighted_vote", "oracle_pass_at_n")


# ----------------------------------------------------------------------------------------------- records


@dataclass
class Attempt:
    """One generated solution, graded by the task."""

    text: str
    answer: str | None  # task.extract_answer (lenient; what grading uses)
    correct: bool  # task.is_correct
    num_tokens: int  # generated tokens, tool insertions included
    num_tool_tokens: int = 0
    finish_reason: str = "eos"
    structured_answer: str | None = None  # parse_final_answer (strict format); None = format violation
    score: float | None = None  # score(question, text), when a scorer is given

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class QuestionRun:
    """Everything sampled for one question: the greedy attempt and ``n_max`` sampled attempts."""

    example: Any  # TaskExample (not serialised)
    prompt: str
    greedy: Attempt
    samples: list[Attempt]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.example.id,
            "gold": self.example.answer,
            "prompt": self.prompt,
            "greedy": self.greedy.to_json(),
            "samples": [s.to_json() for s in self.samples],
        }


# ----------------------------------------------------------------------------------------------- formats

_NUMBER = r"[-\u2212]?\$?\s*\d[\d,]*(?:\.\d+)?"
_FINAL_FORMATS = (
    re.compile(rf"####\s*({_NUMBER})"),
    re.compile(rf"\bthe\s+(?:final\s+)?answer\s+is\s*:?\s*({_NUMBER})", re.IGNORECASE),
)


def parse_final_answer(text: str | None) -> str | None:
    """Canonical number of a final answer written in a fixed format, else None (a format violation).

    Accepted: ``#### <number>`` or "The answer is <number>" (case-insensitive, optional "final"); the last
    such marker in the text wins. Unlike the task's extractor there is no fallback to the last number.
    """
    if not text:
        return None
    found: tuple[int, str] | None = None
    for pattern in _FINAL_FORMATS:
        for match in pattern.finditer(text):
            if found is None or match.start() > found[0]:
                found = (match.start(), match.group(1))
    return None if found is None else metrics.normalize_number(found[1])


def format_report(attempts: Sequence[Attempt]) -> dict[str, float]:
    """Format-violation rate, strict accuracy (violations count as wrong), strict/lenient agreement and the
    share of attempts cut by ``max_new_tokens`` (a common cause of a missing final answer)."""
    if not attempts:
        raise ValueError("format_report: no attempts")
    strict = [a.structured_answer for a in attempts]
    formatted = [a for a, s in zip(attempts, strict) if s is not None]
    return {
        "format_violation_rate": 1.0 - len(formatted) / len(attempts),
        "strict_accuracy": sum(a.correct for a in formatted) / len(attempts),
        "lenient_accuracy": sum(a.correct for a in attempts) / len(attempts),
        "strict_equals_lenient": (
            sum(a.structured_answer == a.answer for a in formatted) / len(formatted)
            if formatted
            else math.nan
        ),
        "length_cut_rate": sum(a.finish_reason == "length" for a in attempts) / len(attempts),
        "n": float(len(attempts)),
    }


def calculation_report(attempts: Sequence[Attempt]) -> dict[str, float]:
    """How attempts used ``<<expr=result>>`` annotations and how many claimed results are wrong."""
    from modern_llm.inference.tools import check_calculation, extract_calculations

    if not attempts:
        raise ValueError("calculation_report: no attempts")
    n_annot = n_wrong = n_invalid = 0
    for a in attempts:
        for expr, claimed in extract_calculations(a.text):
            verdict = check_calculation(expr, claimed)
            n_annot += 1
            n_invalid += verdict is None
            n_wrong += verdict is False
    return {
        "annotations_per_attempt": n_annot / len(attempts),
        "wrong_annotation_rate": n_wrong / n_annot if n_annot else math.nan,
        "invalid_expression_rate": n_invalid / n_annot if n_annot else math.nan,
        "attempts_with_tool_insertion": sum(a.num_tool_tokens > 0 for a in attempts) / len(attempts),
        "tool_tokens_per_attempt": sum(a.num_tool_tokens for a in attempts) / len(attempts),
    }


# ----------------------------------------------------------------------------------------------- scoring


class VerifierScorer:
    """``score(question, solution) -> P(correct)`` from a trained ``models.verifier.Verifier``."""

    def __init__(self, verifier: Any, tokenizer: Any, max_length: int = 512, batch_size: int = 32):
        self.verifier, self.tokenizer = verifier, tokenizer
        self.max_length, self.batch_size = max_length, batch_size

    def score_batch(self, questions: Sequence[str], solutions: Sequence[str]) -> list[float]:
        from modern_llm.training.train_verifier import score_solutions

        return score_solutions(
            self.verifier, self.tokenizer, questions, solutions, self.max_length, self.batch_size
        )

    def __call__(self, question: str, solution: str) -> float:
        return self.score_batch([question], [solution])[0]


class StepCheckScorer:
    """Rule-based scorer: the exact calculator re-checks every arithmetic step (``task.steps_valid``).

    1.0 when every checkable step is right, 0.5 when nothing is checkable, 0.0 when a step is wrong. It
    knows nothing but arithmetic (a copied-wrong number or a wrong operation passes), so it is the reference
    for what a learned verifier on arithmetic tasks could buy by checking the arithmetic alone.
    """

    def __init__(self, task: Any):
        if not hasattr(task, "steps_valid"):
            raise ValueError(f"score: steps needs a math task with steps_valid, got {type(task).__name__}")
        self.task = task

    def __call__(self, question: str, solution: str) -> float:
        verdict = self.task.steps_valid(solution)
        return 0.5 if verdict is None else float(verdict)


def agreement_scorer(runs: Sequence[QuestionRun], task: Any) -> ScoreFn:
    """Training-free confidence: the fraction of the question's sampled answers equal to the attempt's answer.

    Questions are looked up by their prompt text; an attempt without an extractable answer scores 0.
    """
    answers = {run.prompt: [s.answer for s in run.samples] for run in runs}

    def score(question: str, solution: str) -> float:
        if question not in answers:
            raise ValueError("agreement_scorer: unknown question (score only the prompts it was built from)")
        pool = answers[question]
        answer = task.extract_answer(solution)
        if answer is None or not pool:
            return 0.0
        return sum(a == answer for a in pool) / len(pool)

    return score


def score_pairs(score_fn: ScoreFn, questions: Sequence[str], solutions: Sequence[str]) -> list[float]:
    """Scores of (question, solution) pairs, batched when the scorer has ``score_batch``; all must be finite."""
    if len(questions) != len(solutions):
        raise ValueError(f"score_pairs: {len(questions)} questions but {len(solutions)} solutions")
    if not questions:
        return []
    batch = getattr(score_fn, "score_batch", None)
    scores = (
        batch(questions, solutions)
        if batch is not None
        else [score_fn(q, s) for q, s in zip(questions, solutions)]
    )
    out = [float(s) for s in scores]
    if len(out) != len(questions):
        raise ValueError(f"score function returned {len(out)} scores for {len(questions)} pairs")
    bad = [s for s in out if not math.isfinite(s)]
    if bad:
        raise ValueError(f"score function returned non-finite scores {bad[:3]}; scores must be finite floats")
    return out


def attach_scores(runs: Sequence[QuestionRun], score_fn: ScoreFn) -> None:
    """Fill ``score`` of every greedy and sampled attempt, in one batched pass."""
    questions, attempts = [], []
    for run in runs:
        for a in (run.greedy, *run.samples):
            questions.append(run.prompt)
            attempts.append(a)
    for a, s in zip(attempts, score_pairs(score_fn, questions, [a.text for a in attempts])):
        a.score = s


def scorer_quality(runs: Sequence[QuestionRun], score_fn: ScoreFn) -> dict[str, float]:
    """How well scores separate right from wrong sampled attempts.

    ``auc`` pools all samples, so a scorer that only recognises easy QUESTIONS already scores well on it;
    ``within_question_auc`` (mean ROC-AUC over questions that have both right and wrong samples) measures the
    ranking best-of-N actually uses. Uses the attempts' stored scores when present, else ``score_fn``.
    """
    attempts = [a for r in runs for a in r.samples]
    if any(a.score is None for a in attempts):
        questions = [r.prompt for r in runs for _ in r.samples]
        scores = score_pairs(score_fn, questions, [a.text for a in attempts])
    else:
        scores = [float(a.score) for a in attempts]  # type: ignore[arg-type]
    labels = [int(a.correct) for a in attempts]
    right = [s for s, y in zip(scores, labels) if y]
    wrong = [s for s, y in zip(scores, labels) if not y]
    per_question, start = [], 0
    for run in runs:
        ys, ss = labels[start : start + len(run.samples)], scores[start : start + len(run.samples)]
        start += len(run.samples)
        if 0 < sum(ys) < len(ys):
            per_question.append(metrics.roc_auc(ys, ss))
    return {
        "auc": metrics.roc_auc(labels, scores) if right and wrong else math.nan,
        "within_question_auc": float(np.mean(per_question)) if per_question else math.nan,
        "mixed_questions": float(len(per_question)),
        "mean_score_right": float(np.mean(right)) if right else math.nan,
        "mean_score_wrong": float(np.mean(wrong)) if wrong else math.nan,
        "positive_rate": len(right) / len(attempts),
    }


# ----------------------------------------------------------------------------------------------- sampling


def attempt_from_result(task: Any, example: Any, result: Any) -> Attempt:
    """Grade one engine ``GenerationResult`` with the task."""
    return Attempt(
        text=result.text,
        answer=task.extract_answer(result.text),
        correct=bool(task.is_correct(result.text, example)),
        num_tokens=int(result.num_generated_tokens),
        num_tool_tokens=int(result.num_tool_tokens),
        finish_reason=result.finish_reason,
        structured_answer=parse_final_answer(result.text),
    )


def sample_attempts(
    model: Any,
    tokenizer: Any,
    task: Any,
    examples: Sequence[Any],
    prompts: Sequence[str],
    num_samples: int,
    sampling: Any,
    *,
    stop_ids: Sequence[int] | None = None,
    tools: Callable[[str], str | None] | None = None,
    batch_prompts: int = 8,
) -> list[list[Attempt]]:
    """``num_samples`` graded attempts per prompt -> attempts[q][s], through ``inference.generate``.

    Prompts are encoded exactly like the SFT collator encodes them (``prompt_token_ids``), and stop at the
    task's stop strings and at ``stop_ids`` (EOS / end of turn).
    """
    from modern_llm.data.preference_datasets import prompt_token_ids
    from modern_llm.inference.engine import generate

    if len(prompts) != len(examples):
        raise ValueError(f"sample_attempts: {len(prompts)} prompts for {len(examples)} examples")
    if batch_prompts < 1:
        raise ValueError(f"batch_prompts must be >= 1, got {batch_prompts}")
    ids = prompt_token_ids(tokenizer, prompts)
    out: list[list[Attempt]] = []
    for start in range(0, len(ids), batch_prompts):
        results = generate(
            model,
            tokenizer,
            ids[start : start + batch_prompts],
            sampling=sampling,
            num_samples=num_samples,
            stop=list(task.stop_sequences) or None,
            tools=tools,
            eos_token_id=list(stop_ids) if stop_ids else None,
        )
        for offset, row in enumerate(results):
            example = examples[start + offset]
            out.append([attempt_from_result(task, example, r) for r in row])
        log.info("sampled %d/%d prompts x %d", len(out), len(ids), num_samples)  # progress of long runs
    return out


def collect_runs(
    model: Any,
    tokenizer: Any,
    task: Any,
    examples: Sequence[Any],
    prompts: Sequence[str],
    n_max: int,
    sampling: Any,
    *,
    stop_ids: Sequence[int] | None = None,
    tools: Callable[[str], str | None] | None = None,
    batch_prompts: int = 8,
    score_fn: ScoreFn | None = None,
) -> list[QuestionRun]:
    """Greedy attempt + ``n_max`` samples (at ``sampling``) per question, optionally scored."""
    greedy_params = dataclasses.replace(sampling, temperature=0.0)
    kw = {"stop_ids": stop_ids, "tools": tools, "batch_prompts": batch_prompts}
    greedy = sample_attempts(model, tokenizer, task, examples, prompts, 1, greedy_params, **kw)
    sampled = sample_attempts(model, tokenizer, task, examples, prompts, n_max, sampling, **kw)
    runs = [QuestionRun(ex, p, g[0], s) for ex, p, g, s in zip(examples, prompts, greedy, sampled)]
    if score_fn is not None:
        attach_scores(runs, score_fn)
    return runs


# ----------------------------------------------------------------------------------------------- selection


def _first_with_answer(attempts: Sequence[Attempt], answer: Any) -> Attempt | None:
    return None if answer is None else next(a for a in attempts if a.answer == answer)


def select_majority(attempts: Sequence[Attempt]) -> Attempt | None:
    """Self-consistency: the first attempt carrying the most frequent answer; None if no answer parses."""
    return _first_with_answer(attempts, metrics.majority_vote([a.answer for a in attempts]))


def _scores(attempts: Sequence[Attempt]) -> list[float]:
    if any(a.score is None for a in attempts):
        raise ValueError("verifier selection needs scored attempts: pass score_fn / call attach_scores first")
    return [float(a.score) for a in attempts]  # type: ignore[arg-type]


def select_best_of_n(attempts: Sequence[Attempt]) -> Attempt:
    """Best-of-N: the attempt with the highest score (the first one on ties)."""
    if not attempts:
        raise ValueError("select_best_of_n: no attempts")
    scores = _scores(attempts)
    return attempts[max(range(len(attempts)), key=scores.__getitem__)]


def select_weighted_vote(attempts: Sequence[Attempt]) -> Attempt | None:
    """Verifier-weighted vote: the answer with the largest total score (ties -> earliest answer)."""
    return _first_with_answer(
        attempts, metrics.weighted_vote([a.answer for a in attempts], _scores(attempts))
    )


def oracle_pass_at_n(attempts: Sequence[Attempt], n: int) -> float:
    """Unbiased pass@n from all the attempts of one question (Chen et al. 2021)."""
    return metrics.pass_at_k(len(attempts), sum(a.correct for a in attempts), n)


# ----------------------------------------------------------------------------------------------- accuracy vs N


def subsample_indices(n_max: int, n: int, seed: int, question: int, draw: int) -> list[int]:
    """Indices (in sample order) of the size-``n`` subset used for question ``question``, draw ``draw``."""
    if not 1 <= n <= n_max:
        raise ValueError(f"N={n} must be in 1..n_max={n_max}")
    perm = np.random.default_rng([seed, question, draw]).permutation(n_max)
    return sorted(int(i) for i in perm[:n])


def accuracy_vs_n(
    runs: Sequence[QuestionRun], ns: Sequence[int], n_draws: int = 16, seed: int = 0
) -> dict[str, Any]:
    """Accuracy of every method vs N (and generated tokens per question) from one set of n_max samples.

    Returns ``{"N", "n_max", "n_draws", "seed", "n_questions", "greedy": {accuracy, tokens_per_question},
    "tokens_per_question": [per N], "curves": {method: {"accuracy": [per N], "draw_std": [per N]}}}``.
    Verifier curves appear only when every attempt has a score.
    """
    if not runs:
        raise ValueError("accuracy_vs_n: no questions")
    n_max = len(runs[0].samples)
    if any(len(r.samples) != n_max for r in runs):
        raise ValueError("accuracy_vs_n: every question needs the same number of samples (n_max)")
    ns = sorted(set(int(n) for n in ns))
    if not ns or ns[0] < 1 or ns[-1] > n_max:
        raise ValueError(f"ns={ns} must lie in 1..n_max={n_max}")
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    scored = all(a.score is not None for r in runs for a in r.samples)
    methods: dict[str, Callable[[Sequence[Attempt]], Attempt | None]] = {"majority": select_majority}
    if scored:
        methods |= {"verifier_best_of_n": select_best_of_n, "verifier_weighted_vote": select_weighted_vote}
    curves: dict[str, dict[str, list[float]]] = {
        m: {"accuracy": [], "draw_std": []} for m in (*methods, "oracle_pass_at_n")
    }
    tokens: list[float] = []
    for n in ns:
        draws = 1 if n == n_max else n_draws
        per_draw = {m: np.zeros(draws) for m in methods}
        token_sum = 0.0
        for q, run in enumerate(runs):
            for d in range(draws):
                subset = [run.samples[i] for i in subsample_indices(n_max, n, seed, q, d)]
                token_sum += sum(a.num_tokens for a in subset)
                for name, select in methods.items():
                    chosen = select(subset)
                    per_draw[name][d] += chosen is not None and chosen.correct
        for name in methods:
            accs = per_draw[name] / len(runs)
            curves[name]["accuracy"].append(float(accs.mean()))
            curves[name]["draw_std"].append(float(accs.std(ddof=1)) if draws > 1 else 0.0)
        curves["oracle_pass_at_n"]["accuracy"].append(
            float(np.mean([oracle_pass_at_n(r.samples, n) for r in runs]))
        )
        curves["oracle_pass_at_n"]["draw_std"].append(0.0)  # exact expectation, no draws
        tokens.append(token_sum / (len(runs) * draws))
    return {
        "N": ns,
        "n_max": n_max,
        "n_draws": n_draws,
        "seed": seed,
        "n_questions": len(runs),
        "greedy": {
            "accuracy": float(np.mean([r.greedy.correct for r in runs])),
            "tokens_per_question": float(np.mean([r.greedy.num_tokens for r in runs])),
        },
        "sampled_pass_at_1": float(np.mean([oracle_pass_at_n(r.samples, 1) for r in runs])),
        "tokens_per_question": tokens,
        "curves": curves,
    }


# ----------------------------------------------------------------------------------------------- revise


@dataclass
class ReviseConfig:
    enabled: bool = True
    threshold: float = 0.5  # revise when score(question, chosen attempt) < threshold
    rounds: int = 2  # at most this many revision rounds
    num_samples: int = 4  # revision candidates per trigger (one batched engine call); best score competes
    temperature: float = 0.7  # for the candidates (0 = greedy, then num_samples must be 1)
    instruction: str = REVISION_INSTRUCTION

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"revise.rounds must be >= 1, got {self.rounds}")
        if self.num_samples < 1:
            raise ValueError(f"revise.num_samples must be >= 1, got {self.num_samples}")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError("revise.temperature 0 (greedy) gives identical candidates: set num_samples 1")


def revision_prompt(
    task: Any,
    example: Any,
    prompt: str,
    previous: str,
    instruction: str,
    chat: bool,
    tokenizer: Any = None,
    shots: Sequence[Any] = (),
) -> str:
    """The prompt that shows the previous attempt and asks for a corrected one.

    Chat: the task's messages (with the same ``shots`` as the original prompt) + the attempt as the assistant
    turn + the instruction as a new user turn. Plain: the original prompt (which already holds the shots), the
    attempt, the instruction and the task's answer cue.
    """
    if chat:
        messages = task.chat_messages(example, shots) + [
            {"role": "assistant", "content": previous.strip()},
            {"role": "user", "content": instruction},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{prompt} {previous.strip()}\n\n{instruction}\n{task.cue}"


def revise_and_retry(
    model: Any,
    tokenizer: Any,
    task: Any,
    runs: Sequence[QuestionRun],
    initial: Sequence[Attempt],
    score_fn: ScoreFn,
    cfg: ReviseConfig,
    sampling: Any,
    *,
    chat: bool,
    stop_ids: Sequence[int] | None = None,
    tools: Callable[[str], str | None] | None = None,
    batch_prompts: int = 8,
    shots: Sequence[Any] = (),
    max_examples: int = 3,
) -> dict[str, Any]:
    """Revise ``initial[q]`` (the attempt chosen for ``runs[q]``) while its score is below the threshold.

    Returns ``{"final": [Attempt], "rounds": [per-round log], "summary": {...}, "examples": [...]}``; the
    summary has accuracy before/after, how many questions triggered (and how many of those were right or
    wrong before), fixes (wrong -> right), breaks (right -> wrong) and extra generated tokens per question.
    """
    if len(initial) != len(runs):
        raise ValueError(f"revise_and_retry: {len(initial)} initial attempts for {len(runs)} questions")
    current = list(initial)
    missing = [q for q, a in enumerate(current) if a.score is None]
    for q, s in zip(
        missing, score_pairs(score_fn, [runs[q].prompt for q in missing], [current[q].text for q in missing])
    ):
        current[q] = dataclasses.replace(current[q], score=s)
    start = list(current)
    extra_tokens = [0] * len(runs)
    ever_triggered: set[int] = set()
    rounds = []
    for r in range(cfg.rounds):
        triggered = [q for q, a in enumerate(current) if a.score < cfg.threshold]  # type: ignore[operator]
        if not triggered:
            break
        ever_triggered.update(triggered)
        were_correct = sum(current[q].correct for q in triggered)
        prompts = [
            revision_prompt(
                task,
                runs[q].example,
                runs[q].prompt,
                current[q].text,
                cfg.instruction,
                chat,
                tokenizer,
                shots,
            )
            for q in triggered
        ]
        params = dataclasses.replace(
            sampling, temperature=cfg.temperature, seed=(sampling.seed or 0) + 7919 * (r + 1)
        )
        candidates = sample_attempts(
            model,
            tokenizer,
            task,
            [runs[q].example for q in triggered],
            prompts,
            cfg.num_samples,
            params,
            stop_ids=stop_ids,
            tools=tools,
            batch_prompts=batch_prompts,
        )
        flat_q = [runs[q].prompt for q, row in zip(triggered, candidates) for _ in row]
        flat_scores = score_pairs(score_fn, flat_q, [a.text for row in candidates for a in row])
        accepted = fixed = broken = 0
        for i, (q, row) in enumerate(zip(triggered, candidates)):
            for j, a in enumerate(row):
                a.score = flat_scores[i * cfg.num_samples + j]
                extra_tokens[q] += a.num_tokens
            best = select_best_of_n(row)
            if best.score > current[q].score:  # type: ignore[operator]
                fixed += best.correct and not current[q].correct
                broken += current[q].correct and not best.correct
                accepted += 1
                current[q] = best
        rounds.append(
            {
                "round": r + 1,
                "triggered": len(triggered),
                "triggered_were_correct": were_correct,
                "accepted": accepted,
                "fixed": fixed,
                "broken": broken,
                "accuracy_after": sum(a.correct for a in current) / len(current),
            }
        )
    n = len(runs)
    fixed_q = [q for q in range(n) if current[q].correct and not start[q].correct]
    broken_q = [q for q in range(n) if start[q].correct and not current[q].correct]
    summary = {
        "threshold": cfg.threshold,
        "max_rounds": cfg.rounds,
        "accuracy_before": sum(a.correct for a in start) / n,
        "accuracy_after": sum(a.correct for a in current) / n,
        "trigger_rate": len(ever_triggered) / n,
        "triggered_initially_correct": sum(start[q].correct for q in ever_triggered),
        "triggered_initially_wrong": sum(not start[q].correct for q in ever_triggered),
        "not_triggered_wrong": sum(not start[q].correct for q in range(n) if q not in ever_triggered),
        "fixed": len(fixed_q),
        "broken": len(broken_q),
        "extra_tokens_per_question": sum(extra_tokens) / n,
    }
    examples = [
        {
            "kind": kind,
            "question": runs[q].example.text,
            "gold": runs[q].example.answer,
            "before": start[q].text,
            "before_score": start[q].score,
            "after": current[q].text,
            "after_score": current[q].score,
        }
        for kind, qs in (("fixed", fixed_q), ("broken", broken_q))
        for q in qs[:max_examples]
    ]
    return {"final": current, "rounds": rounds, "summary": summary, "examples": examples}


# ----------------------------------------------------------------------------------------------- plots

_METHOD_STYLE = {
    "majority": ("tab:blue", "o", "majority vote"),
    "verifier_best_of_n": ("tab:green", "s", "verifier best-of-N"),
    "verifier_weighted_vote": ("tab:purple", "^", "verifier-weighted vote"),
    "oracle_pass_at_n": ("tab:gray", "x", "oracle pass@N"),
}
_CONDITION_LINES = ("-", "--", ":", "-.")


def plot_curves(curves_by_condition: dict[str, dict[str, Any]], path: str | Path, title: str) -> Path:
    """Accuracy vs N (left) and vs generated tokens per question (right), one line style per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_n, ax_t) = plt.subplots(1, 2, figsize=(12, 4.6))
    for (condition, res), line in zip(curves_by_condition.items(), _CONDITION_LINES):
        for method, values in res["curves"].items():
            color, marker, label = _METHOD_STYLE[method]
            text = f"{label} ({condition})"
            ax_n.plot(res["N"], values["accuracy"], line, color=color, marker=marker, label=text)
            ax_t.plot(
                res["tokens_per_question"], values["accuracy"], line, color=color, marker=marker, label=text
            )
        greedy = res["greedy"]
        ax_n.axhline(
            greedy["accuracy"], color="black", linestyle=line, linewidth=1, label=f"greedy ({condition})"
        )
        ax_t.plot([greedy["tokens_per_question"]], [greedy["accuracy"]], "k*", markersize=10)
    ax_n.set_xscale("log", base=2)
    first = next(iter(curves_by_condition.values()))
    ax_n.set_xticks(first["N"], [str(n) for n in first["N"]])
    ax_n.set_xlabel("N samples per question")
    ax_t.set_xscale("log")
    ax_t.set_xlabel("generated tokens per question (star = greedy)")
    for ax in (ax_n, ax_t):
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    ax_n.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- experiment config


@dataclass
class SamplingConfig:
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 160


@dataclass
class PrepareConfig:
    """``model: scratch``: SFT a fresh ModernDecoderLM and train its verifier first (reused when present)."""

    out_dir: str = "runs/test_time/arithmetic-scratch"
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    sft_steps: int = 400
    sft_batch_size: int = 16
    sft_lr: float = 2e-3
    verifier_questions: int = 300  # train questions the SFT policy samples solutions for
    verifier_samples: int = 8
    verifier_temperature: float = 1.0
    verifier_eval_fraction: float = 0.2  # held-out questions for the verifier's AUC
    verifier_steps: int = 150
    verifier_batch_size: int = 16
    verifier_lr: float = 5e-4


@dataclass
class TestTimeConfig:
    __test__ = False  # not a pytest test class despite the name
    name: str = "test-time-arithmetic-scratch"
    model: str = "scratch"  # "scratch" (see prepare) | policy folder | HF folder | registry name
    verifier: str | None = None  # save_verifier folder; for scratch, the prepared verifier is the default
    # scores for reranking/revision: "verifier" (trained) | "steps" (calculator re-checks each step) |
    # "agreement" (share of the question's samples with the same answer) | "none"
    score: str = "verifier"
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    instruction: str | None = None  # the task's instruction line as the policy was trained (None = default)
    eval_split: str = "test"
    n_questions: int = 50
    shots: int = 0  # fixed demonstrations in every prompt
    shot_task: str | None = None  # take them from another task (e.g. gsm8k: solutions with <<a*b=c>> calls)
    shot_split: str = "train"
    n_max: int = 32  # samples per question; smaller N are subsampled from these
    ns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    n_draws: int = 16  # random subsets per (question, N) averaged
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tools: str = "compare"  # calculator tool: "off" | "on" | "compare" (both)
    revise: ReviseConfig = field(default_factory=ReviseConfig)
    revise_targets: list[str] = field(default_factory=lambda: ["greedy"])  # "greedy" and/or "best_of_n"
    batch_prompts: int = 8  # prompts per engine call (each expanded to n_max rows)
    seed: int = 0
    threads: int = 1  # torch threads (1 is faster on a shared 2-core box; see bench/decode.py)
    dtype: str = "fp32"  # weights of the sampling model: "bf16" = a bf16 copy (faster with AMX/GPUs)
    # sample a HF Llama policy through a ModernDecoderLM copy (same weights): its N samples per prompt share
    # the prompt's KV cache, so long few-shot prompts stop dominating decode (train_sft.inference_model)
    native_decode: bool = False
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    results_dir: str = "experiments/test_time"
    samples_dir: str = "runs/test_time"  # per-sample JSONL (not committed)
    # a samples folder of an earlier run (<samples_dir>/<name>): score its saved samples with ``score``
    # instead of generating (no model is loaded; revise-and-retry, which needs the model, is skipped)
    rescore_from: str | None = None
    # names of finished runs (their records in results_dir, e.g. one per training seed): write mean ± std
    # over them as this run's records instead of generating
    aggregate: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from modern_llm.training.train_sft import GENERATION_DTYPES

        if self.dtype not in GENERATION_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(GENERATION_DTYPES)}, got {self.dtype!r}")
        if self.score not in ("verifier", "steps", "agreement", "none"):
            raise ValueError(f"score must be 'verifier', 'steps', 'agreement' or 'none', got {self.score!r}")
        if self.tools not in ("off", "on", "compare"):
            hint = (
                " (YAML reads a bare on/off as true/false: quote it)" if isinstance(self.tools, bool) else ""
            )
            raise ValueError(f"tools must be 'off', 'on' or 'compare', got {self.tools!r}{hint}")
        if self.n_max < 1 or self.n_questions < 1:
            raise ValueError(f"n_max ({self.n_max}) and n_questions ({self.n_questions}) must be >= 1")
        if not self.ns or min(self.ns) < 1 or max(self.ns) > self.n_max:
            raise ValueError(f"ns={self.ns} must be non-empty and within 1..n_max={self.n_max}")
        bad = [t for t in self.revise_targets if t not in ("greedy", "best_of_n")]
        if bad:
            raise ValueError(f"revise_targets entries must be 'greedy' or 'best_of_n', got {bad}")
        if "best_of_n" in self.revise_targets and self.score not in ("verifier", "steps"):
            raise ValueError("revise_targets 'best_of_n' needs score: verifier or steps")


def _sampling_params(cfg: TestTimeConfig, seed: int):
    from modern_llm.inference.sampling import SamplingParams

    s = cfg.sampling
    return SamplingParams(
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=seed
    )


def _train_cfg(out_dir: Path, seed: int, steps: int, batch: int, lr: float):
    from modern_llm.config.train_config import TrainConfig

    return TrainConfig(
        out_dir=str(out_dir),
        seed=seed,
        device="cpu",
        dtype="fp32",
        batch_size=batch,
        max_steps=steps,
        lr=lr,
        warmup_steps=max(1, steps // 20),
        log_every=max(1, steps // 10),
        progress=False,
        tensorboard=False,
        keep_last_k=1,
        resume="none",
    )


def prepare_scratch(cfg: TestTimeConfig) -> tuple[Path, Path, dict[str, Any]]:
    """SFT policy + verifier for ``model: scratch`` through the project's stages; reused when already saved.

    Steps: BPE + fresh ModernDecoderLM (``train_sft.build_scratch_policy``), SFT on the train split
    (``train_sft.train_sft``), on-policy samples on ``verifier_questions`` train questions labelled by the task
    (``preference_datasets.sample_solutions``), verifier = policy trunk + head trained with BCE
    (``train_verifier.train_verifier``), AUC on held-out train questions.
    """
    from modern_llm.data.preference_datasets import sample_solutions
    from modern_llm.inference.sampling import SamplingParams
    from modern_llm.models.verifier import save_verifier, verifier_from_lm
    from modern_llm.training.train_sft import (
        build_scratch_policy,
        generation_model,
        load_task,
        save_policy,
        scratch_tokenizer_texts,
        sft_records,
        stop_token_ids,
        train_sft,
    )
    from modern_llm.training.train_verifier import VerifierConfig, train_verifier, verifier_records

    p = cfg.prepare
    out = Path(p.out_dir)
    policy_dir, verifier_dir, summary_file = out / "policy", out / "verifier", out / "prepare.json"
    if (policy_dir / "model.safetensors").is_file() and (verifier_dir / "verifier.yaml").is_file():
        log.info("reusing prepared scratch policy and verifier in %s", out)
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        return policy_dir, verifier_dir, summary
    t0 = time.time()
    task = load_task(cfg.data, cfg.instruction)
    train = task.load(cfg.data.split, data_dir=cfg.data.data_dir, limit=cfg.data.limit)
    model, tokenizer = build_scratch_policy(p.scratch, scratch_tokenizer_texts(task, train), cfg.seed)
    sft = train_sft(
        model,
        tokenizer,
        sft_records(task, train, tokenizer, cfg.data.chat),
        _train_cfg(out / "sft", cfg.seed, p.sft_steps, p.sft_batch_size, p.sft_lr),
        cfg.data.max_length,
    )
    save_policy(model, tokenizer, policy_dir)
    questions = train[: p.verifier_questions]
    prompts = [task.render_prompt(ex, chat=cfg.data.chat, tokenizer=tokenizer) for ex in questions]
    sampling = SamplingParams(
        temperature=p.verifier_temperature, max_new_tokens=cfg.sampling.max_new_tokens, seed=cfg.seed + 10_000
    )
    samples = sample_solutions(
        generation_model(model),
        tokenizer,
        task,
        questions,
        prompts,
        p.verifier_samples,
        sampling,
        stop_token_ids(tokenizer),
        cfg.batch_prompts,
    )
    n_eval_q = max(1, round(p.verifier_eval_fraction * len(questions)))  # split by question, not by sample
    eval_records = verifier_records(prompts[:n_eval_q], samples[:n_eval_q])
    train_records = verifier_records(prompts[n_eval_q:], samples[n_eval_q:])
    verifier = verifier_from_lm(model)
    ver = train_verifier(
        verifier,
        tokenizer,
        train_records,
        VerifierConfig(max_length=cfg.data.max_length),
        _train_cfg(out / "verifier_train", cfg.seed, p.verifier_steps, p.verifier_batch_size, p.verifier_lr),
        eval_records,
    )
    save_verifier(verifier, verifier_dir, tokenizer)
    flat = [s for row in samples for s in row]
    summary = {
        "sft_final_train_loss": sft.get("train/loss"),
        "verifier_train_records": len(train_records),
        "verifier_eval_records": len(eval_records),
        "policy_sample_accuracy_on_train_questions": sum(s.correct for s in flat) / len(flat),
        "verifier_eval": {k: v for k, v in ver.items() if k.startswith("eval/")},
        "duration_s": round(time.time() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    summary_file.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return policy_dir, verifier_dir, summary


def _demonstrations(cfg: TestTimeConfig, examples: Sequence[Any]) -> list[Any]:
    from modern_llm.data.task_datasets import get_task, pick_shots

    if cfg.shots == 0:
        return []
    shot_task = get_task(cfg.shot_task) if cfg.shot_task else get_task(cfg.data.task, **cfg.data.task_args)
    pool = shot_task.load(cfg.shot_split, data_dir=cfg.data.data_dir, limit=500)
    same_source = (cfg.shot_task or cfg.data.task) == cfg.data.task and cfg.shot_split == cfg.eval_split
    eval_ids = {ex.id for ex in examples} if same_source else set()
    pool = [ex for ex in pool if ex.id not in eval_ids]  # a demonstration is never an evaluated question
    return pick_shots(pool, cfg.shots, seed=cfg.seed)


def _condition_summary(runs: Sequence[QuestionRun], cfg: TestTimeConfig) -> dict[str, Any]:
    sampled = [a for r in runs for a in r.samples]
    greedy = [r.greedy for r in runs]
    return {
        "accuracy_vs_n": accuracy_vs_n(runs, cfg.ns, cfg.n_draws, cfg.seed),
        "format": {"greedy": format_report(greedy), "samples": format_report(sampled)},
        "calculator": {"greedy": calculation_report(greedy), "samples": calculation_report(sampled)},
    }


def _write_samples(path: Path, runs: Sequence[QuestionRun]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for run in runs:
            fh.write(json.dumps(run.to_json(), ensure_ascii=False) + "\n")


def _revise_all(cfg, model, tokenizer, task, runs, score_fn, stop_ids, tools, shots) -> dict[str, Any]:
    out = {}
    for target in cfg.revise_targets:
        initial = (
            [r.greedy for r in runs] if target == "greedy" else [select_best_of_n(r.samples) for r in runs]
        )
        t0 = time.time()
        res = revise_and_retry(
            model,
            tokenizer,
            task,
            runs,
            initial,
            score_fn,
            cfg.revise,
            _sampling_params(cfg, cfg.seed + 20_000),
            chat=cfg.data.chat,
            stop_ids=stop_ids,
            tools=tools,
            batch_prompts=cfg.batch_prompts,
            shots=shots,
        )
        out[target] = {
            "summary": res["summary"],
            "rounds": res["rounds"],
            "examples": res["examples"],
            "duration_s": round(time.time() - t0, 1),
        }
    return out


def load_runs(path: str | Path) -> list[QuestionRun]:
    """Question runs saved by ``_write_samples`` (the example keeps only its id and gold answer)."""
    from modern_llm.data.task_datasets import TaskExample

    runs = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            runs.append(
                QuestionRun(
                    TaskExample(id=row["id"], text="", answer=row["gold"]),
                    row["prompt"],
                    Attempt(**row["greedy"]),
                    [Attempt(**s) for s in row["samples"]],
                )
            )
    return runs


def rescore_experiment(cfg: TestTimeConfig) -> dict[str, Any]:
    """Re-rank the saved samples of an earlier run with another scorer (same samples, no generation)."""
    from modern_llm.training.train_sft import load_task
    from modern_llm.utils.records import now_iso

    started, t0 = now_iso(), time.time()
    if cfg.score not in ("steps", "agreement"):
        raise ValueError("rescore_from needs a scorer without a model: score steps or agreement")
    task = load_task(cfg.data, cfg.instruction)
    folder = Path(cfg.rescore_from)
    conditions = {"off": ["tool_off"], "on": ["tool_on"], "compare": ["tool_off", "tool_on"]}[cfg.tools]
    results: dict[str, Any] = {}
    for condition in conditions:
        path = folder / f"{condition}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: rescore_from must be a samples folder of a run")
        runs = load_runs(path)
        score_fn = StepCheckScorer(task) if cfg.score == "steps" else agreement_scorer(runs, task)
        attach_scores(runs, score_fn)
        results[condition] = _condition_summary(runs, cfg)
        results[condition]["scorer"] = scorer_quality(runs, score_fn)
        n_questions, n_max = len(runs), len(runs[0].samples)
        log.info("%s: %s", condition, _headline(results[condition]))
    figure = plot_curves(
        {c: r["accuracy_vs_n"] for c, r in results.items()},
        Path(cfg.results_dir) / f"{cfg.name}-accuracy-vs-n.png",
        f"{cfg.name}: {cfg.data.task} ({n_questions} questions), rescored with {cfg.score}",
    )
    protocol = {
        "rescored_samples": str(folder),
        "n_questions": n_questions,
        "N_max": n_max,
        "N": list(cfg.ns),
        "score": cfg.score,
        "revise": "skipped (rescoring saved samples needs no model; revision would)",
        "policy": f"samples of {folder.name}",
        "figure": str(figure),
        "config": config_to_dict(cfg),
    }
    paths = write_records(cfg, record_payloads(results, {}), protocol, started, time.time() - t0)
    return {"conditions": results, "revise": {}, "prepare": {}, "records": [str(p) for p in paths]}


def mean_std_tree(trees: Sequence[Any]) -> Any:
    """Nested dicts with the same keys and numeric leaves -> the same nesting with [mean, std] leaves
    (keys missing from any tree are dropped)."""
    from modern_llm.evaluation import metrics

    first = trees[0]
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(t, dict) and k in t for t in trees)]
        return {k: mean_std_tree([t[k] for t in trees]) for k in keys}
    if any(t is None for t in trees):  # a record's null (e.g. AUC with one class): no mean either
        return None
    return list(metrics.mean_std([float(t) for t in trees]))


def aggregate_experiment(cfg: TestTimeConfig) -> dict[str, Any]:
    """mean ± std over finished runs (``cfg.aggregate``) of accuracy-vs-N and the scorer's quality."""
    from modern_llm.utils.records import now_iso, read_record, write_record

    started, t0 = now_iso(), time.time()
    results = Path(cfg.results_dir)
    paths = []
    for suffix, key in (("", "accuracy"), ("-scorer", "scorer")):
        sources = [read_record(results / f"{name}{suffix}.json") for name in cfg.aggregate]
        paths.append(
            write_record(
                results / f"{cfg.name}{suffix}.json",
                name=f"{cfg.name}{suffix}",
                task=sources[0]["task"],
                model=f"mean ± std over {len(sources)} runs",
                metrics={key: mean_std_tree([s["metrics"][key] for s in sources])},
                protocol={
                    "aggregated_runs": list(cfg.aggregate),
                    "source_commits": sorted({s["git_commit"] for s in sources}),
                    "per_run_protocol": "see each source record (same config, one training seed each)",
                },
                seed=None,
                device=sources[0]["device"],
                dtype=sources[0]["dtype"],
                started=started,
                duration_s=time.time() - t0,
            )
        )
    return {"conditions": {}, "revise": {}, "prepare": {}, "records": [str(p) for p in paths]}


def run_experiment(cfg: TestTimeConfig) -> dict[str, Any]:
    """Sample, score, rerank, revise, compare tool on/off; write the JSON record, PNG and sample JSONL."""
    import torch

    if cfg.aggregate:
        return aggregate_experiment(cfg)
    if cfg.rescore_from is not None:
        return rescore_experiment(cfg)

    from modern_llm.inference.tools import calculator_completion
    from modern_llm.training.train_sft import (
        inference_model,
        is_native,
        load_policy,
        load_task,
        stop_token_ids,
    )
    from modern_llm.utils.records import now_iso

    torch.set_num_threads(cfg.threads)
    started, t0 = now_iso(), time.time()
    prepared: dict[str, Any] = {}
    policy, verifier_path = cfg.model, cfg.verifier
    if cfg.model == "scratch":
        policy_dir, verifier_dir, prepared = prepare_scratch(cfg)
        policy, verifier_path = str(policy_dir), verifier_path or str(verifier_dir)
    task = load_task(cfg.data, cfg.instruction)
    examples = task.load(cfg.eval_split, data_dir=cfg.data.data_dir, limit=cfg.n_questions)
    model, tokenizer = load_policy(policy)
    model = inference_model(model, cfg.dtype, native=cfg.native_decode).eval()
    shots = _demonstrations(cfg, examples)
    prompts = [task.render_prompt(ex, shots, chat=cfg.data.chat, tokenizer=tokenizer) for ex in examples]
    stop_ids = stop_token_ids(tokenizer)
    score_fn: ScoreFn | None = None
    if cfg.score == "verifier":
        if not verifier_path:
            raise ValueError(
                "score: verifier needs --verifier <folder written by save_verifier> (or score agreement)"
            )
        from modern_llm.models.verifier import inference_verifier, load_verifier
        from modern_llm.training.train_sft import GENERATION_DTYPES

        verifier = inference_verifier(load_verifier(verifier_path), GENERATION_DTYPES[cfg.dtype])
        score_fn = VerifierScorer(verifier, tokenizer, cfg.data.max_length)
    elif cfg.score == "steps":
        score_fn = StepCheckScorer(task)
    conditions = {"off": ["tool_off"], "on": ["tool_on"], "compare": ["tool_off", "tool_on"]}[cfg.tools]
    results: dict[str, Any] = {}
    all_runs: dict[str, list[QuestionRun]] = {}
    for condition in conditions:
        tools = calculator_completion if condition == "tool_on" else None
        t_cond = time.time()
        runs = collect_runs(
            model,
            tokenizer,
            task,
            examples,
            prompts,
            cfg.n_max,
            _sampling_params(cfg, cfg.seed),
            stop_ids=stop_ids,
            tools=tools,
            batch_prompts=cfg.batch_prompts,
            score_fn=score_fn,
        )
        results[condition] = _condition_summary(runs, cfg) | {"sampling_s": round(time.time() - t_cond, 1)}
        if cfg.score != "none":
            quality_fn = score_fn if score_fn is not None else agreement_scorer(runs, task)
            results[condition]["scorer"] = scorer_quality(runs, quality_fn)
        all_runs[condition] = runs
        _write_samples(Path(cfg.samples_dir) / cfg.name / f"{condition}.jsonl", runs)
        log.info("%s: %s", condition, _headline(results[condition]))
    revise: dict[str, Any] = {}
    if cfg.revise.enabled and cfg.score != "none":
        primary = conditions[0]
        runs = all_runs[primary]
        revise_score = score_fn if score_fn is not None else agreement_scorer(runs, task)
        tools = calculator_completion if primary == "tool_on" else None
        revise = {"condition": primary, "scorer": cfg.score} | _revise_all(
            cfg, model, tokenizer, task, runs, revise_score, stop_ids, tools, shots
        )
    figure = plot_curves(
        {c: r["accuracy_vs_n"] for c, r in results.items()},
        Path(cfg.results_dir) / f"{cfg.name}-accuracy-vs-n.png",
        f"{cfg.name}: {cfg.data.task} ({len(examples)} questions), {policy}, T={cfg.sampling.temperature}",
    )
    protocol = {
        "eval_split": cfg.eval_split,
        "n_questions": len(examples),
        "shots": cfg.shots,
        "shot_source": f"{cfg.shot_task or cfg.data.task}/{cfg.shot_split}" if cfg.shots else None,
        "chat": cfg.data.chat,
        "N_max": cfg.n_max,
        "N": list(cfg.ns),
        "subsampling": (
            f"sampled once at N_max={cfg.n_max} per question; smaller N use nested random subsets (seeded by "
            f"(seed={cfg.seed}, question, draw)), averaged over {cfg.n_draws} draws; oracle pass@N uses the "
            "unbiased estimator over all N_max samples"
        ),
        "temperature": cfg.sampling.temperature,
        "top_k": cfg.sampling.top_k,
        "top_p": cfg.sampling.top_p,
        "max_new_tokens": cfg.sampling.max_new_tokens,
        "compute_axis": "generated tokens per question (sampled + tool-inserted); prompt prefilled once",
        "score": cfg.score,
        "verifier": verifier_path if cfg.score == "verifier" else None,
        "revise": {
            "threshold": cfg.revise.threshold,
            "max_rounds": cfg.revise.rounds,
            "candidates_per_trigger": cfg.revise.num_samples,
            "temperature": cfg.revise.temperature,
            "targets": list(cfg.revise_targets),
            "acceptance": "revision replaces the attempt only if its "
            "score is higher; scored against the original prompt",
        },
        "policy": policy,
        "threads": cfg.threads,
        "generation_dtype": cfg.dtype,
        "decode_backend": "native (shared-prefix KV)" if is_native(model) else "hf",
        "figure": str(figure),
        "config": config_to_dict(cfg),
    }
    protocol["timings_s"] = {c: r.pop("sampling_s") for c, r in results.items()}
    if prepared:
        protocol["policy_training"] = prepared
    paths = write_records(cfg, record_payloads(results, revise), protocol, started, time.time() - t0)
    return {"conditions": results, "revise": revise, "prepare": prepared, "records": [str(p) for p in paths]}


def record_payloads(results: dict[str, Any], revise: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Metrics of the run split into table-shaped records: suffix -> metrics.

    ``""``: accuracy of every method and generated tokens per question, one column per N ("N=1", ...);
    ``"-revise"``: the revise-and-retry summary per target (per-round logs and examples as lists);
    ``"-format"``: format violations / strict accuracy per condition; ``"-tool"``: calculator usage;
    ``"-scorer"``: how well the scores (verifier or agreement) separate right from wrong samples.
    Each record's rows share one set of columns, so ``evaluation.report_tables`` renders it as one table.
    """
    accuracy: dict[str, Any] = {}
    tokens: dict[str, Any] = {}
    spread: dict[str, Any] = {}
    for cond, r in results.items():
        res = r["accuracy_vs_n"]
        cols = [f"N={n}" for n in res["N"]]
        accuracy[cond] = {"greedy": {"N=1": res["greedy"]["accuracy"]}}
        spread[cond] = {}
        for method, values in res["curves"].items():
            accuracy[cond][method] = dict(zip(cols, values["accuracy"]))
            if method != "oracle_pass_at_n":  # a list of dicts: kept in the JSON, never a table cell
                spread[cond][method] = [{"N": n, "std": sd} for n, sd in zip(res["N"], values["draw_std"])]
        tokens[cond] = {
            "greedy": {"N=1": res["greedy"]["tokens_per_question"]},
            "sampled": dict(zip(cols, res["tokens_per_question"])),
        }
    payloads = {
        "": {"accuracy": accuracy, "tokens_per_question": tokens, "subset_std_over_draws": spread},
        "-format": {"format": {c: r["format"] for c, r in results.items()}},
        "-tool": {"calculator": {c: r["calculator"] for c, r in results.items()}},
    }
    if any("scorer" in r for r in results.values()):
        payloads["-scorer"] = {"scorer": {c: r["scorer"] for c, r in results.items() if "scorer" in r}}
    targets = {k: v for k, v in revise.items() if isinstance(v, dict)}
    if targets:
        payloads["-revise"] = {
            "revise": {t: v["summary"] for t, v in targets.items()},
            "rounds": {t: v["rounds"] for t, v in targets.items()},
            "examples": {t: v["examples"] for t, v in targets.items()},
        }
    for target in targets.values():  # threshold / rounds are settings: they live in the protocol
        for key in ("threshold", "max_rounds"):
            target["summary"].pop(key, None)
    return payloads


def write_records(
    cfg: TestTimeConfig,
    payloads: dict[str, dict[str, Any]],
    protocol: dict[str, Any],
    started: str,
    duration: float,
) -> list[Path]:
    from modern_llm.utils.records import write_record

    return [
        write_record(
            Path(cfg.results_dir) / f"{cfg.name}{suffix}.json",
            name=f"{cfg.name}{suffix}",
            task=f"test_time/{cfg.data.task}",
            model=protocol["policy"],
            metrics=metrics,
            protocol=protocol,
            seed=cfg.seed,
            device="cpu",
            dtype=protocol.get("generation_dtype", "fp32"),
            started=started,
            duration_s=duration,
        )
        for suffix, metrics in payloads.items()
    ]


def _headline(cond: dict[str, Any]) -> str:
    res = cond["accuracy_vs_n"]
    parts = [f"greedy {res['greedy']['accuracy']:.3f}"]
    for method, values in res["curves"].items():
        parts.append(f"{method}@{res['N'][-1]} {values['accuracy'][-1]:.3f}")
    return ", ".join(parts)


def markdown_tables(out: dict[str, Any]) -> str:
    """Accuracy-vs-N table per condition + the revise summary, as Markdown (printed by ``main``)."""
    lines = []
    for condition, cond in out["conditions"].items():
        res = cond["accuracy_vs_n"]
        lines += [
            f"### {condition} (greedy {100 * res['greedy']['accuracy']:.1f}%, "
            f"{res['greedy']['tokens_per_question']:.0f} tokens/question; sampled pass@1 "
            f"{100 * res['sampled_pass_at_1']:.1f}%)",
            "",
        ]
        methods = list(res["curves"])
        lines.append("| N | tokens/question | " + " | ".join(methods) + " |")
        lines.append("|---|---|" + "---|" * len(methods))
        for i, n in enumerate(res["N"]):
            cells = [f"{100 * res['curves'][m]['accuracy'][i]:.1f}" for m in methods]
            lines.append(f"| {n} | {res['tokens_per_question'][i]:.0f} | " + " | ".join(cells) + " |")
        fmt = cond["format"]["samples"]
        lines += [
            "",
            f"format violations (samples): {100 * fmt['format_violation_rate']:.1f}%, strict accuracy "
            f"{100 * fmt['strict_accuracy']:.1f}% vs lenient {100 * fmt['lenient_accuracy']:.1f}%",
            "",
        ]
    for target, rev in out.get("revise", {}).items():
        if isinstance(rev, dict) and "summary" in rev:
            s = rev["summary"]
            lines.append(
                f"revise ({target}): {100 * s['accuracy_before']:.1f}% -> {100 * s['accuracy_after']:.1f}%, "
                f"triggered {100 * s['trigger_rate']:.1f}%, fixed {s['fixed']}, broken {s['broken']}, "
                f"+{s['extra_tokens_per_question']:.0f} tokens/question"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config_cli(
        TestTimeConfig,
        sys.argv[1:] if argv is None else argv,
        prog="modern-llm test-time",
        description="Test-time compute on a math task: N samples per question through the one engine, then "
        "greedy / majority vote / verifier best-of-N / verifier-weighted vote / oracle pass@N vs N and vs "
        "generated tokens, calculator tool on vs off, revise-and-retry, format-violation rate. Writes a JSON "
        "record and a PNG into results_dir.",
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = run_experiment(cfg)
    print(markdown_tables(out))
    print("records: " + ", ".join(out["records"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
