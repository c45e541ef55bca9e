"""Error analysis: sort a model's predictions into named failure categories, with counts and saved examples.

Every ``analyze_*`` function is pure: ``(examples, predictions, k) -> {"task", "n", "counts", "examples", ...}``
where ``examples[category]`` keeps the first ``k`` cases of that category (input, reference, prediction and
the evidence that put it there), so a reader can check each label by eye.

Categories
- SST-2 (errors only; correct ones are counted as "correct"): "negation" — the sentence has a negation cue
  (not, n't, never, no, nothing, hardly, ...) that can flip its polarity; "contrast" — it turns on a
  contrastive connective (but, however, although, ...), where the clause after it usually carries the
  sentiment; "other". A sentence with both cues counts as "negation" (checked first; documented priority so
  the counts add up to n). "unparsed" = a prediction that is not a label. ``rates`` gives the error rate
  inside each cue group next to the overall one — the number that says whether negation is actually harder.
- Math (exclusive, checked in this order): "extraction_failure" — the grader finds no answer, or the answer
  is wrong and the text has no final-answer marker ("####", "answer is", "Answer:", \\boxed{}): a format
  violation; "correct" — the extracted answer matches; "arithmetic_slip" — some step's claimed result is
  wrong when re-computed by the safe calculator (steps are GSM8K ``<<expr=result>>`` annotations and
  inline "a op b = c" equations); "wrong_plan" — every checkable step is right but the answer is wrong
  (the model computed the wrong thing).
- SAMSum (flags, not exclusive: one summary can both drop a speaker and invent a name): "missing_speaker" —
  a dialogue speaker named in the reference summary does not appear in the prediction; "hallucinated_entity" —
  a capitalised word of the prediction appears in neither the dialogue nor the reference (after a small
  stop-list of sentence-initial function words); "ok" — neither.

Footguns
- Inline equations are re-checked with ``modern_llm.inference.tools.check_calculation`` (never eval): a
  claimed result may be rounded to its written precision ("10/3 = 3.33" is right). A percentage claim
  ("1/4 = 25%") is accepted as either the value or 100x the value; a tight fraction is one number
  ("25 / 1/3" = 75). Anything ambiguous is skipped rather than judged: an expression cut by a unit word
  ("200 GB * 40% = 80"), algebra ("3x + 4 = 28"), clock times, mixed numbers ("3 1/2"), space-grouped
  thousands. Measured on the GSM8K reference solutions (train + test): all 27,235 distinct calculator
  annotations check out; of the 997 further inline-only steps 33 are flagged, on inspection mostly real
  typos in the references ("8*3 = 240", "192*100=$1920") and a few ambiguous notations ("Weeks 1-2 =").
- The entity check is lexical: "Tom" in the prediction but only "tom" in the dialogue is not a
  hallucination (case-insensitive), while a nickname or spelling variant is one.
- Who decides "correct": ``analyze(task, ...)`` (and the CLI) plug in the task's own ``extract_answer`` from
  ``modern_llm.data.task_datasets``, so the "correct" count equals what the evaluation scored. The
  ``analyze_*`` functions used alone default to standalone extractors (math: marker-strict
  ``extract_final_answer``), which can disagree with a lenient grader.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from modern_llm.evaluation.metrics import exact_match, normalize_number
from modern_llm.inference.tools import (
    CalculatorError,
    check_calculation,
    extract_calculations,
    safe_eval_exact,
)

Example = dict[str, Any]


def _check_lengths(examples: Sequence[Any], predictions: Sequence[Any], task: str) -> None:
    if len(examples) != len(predictions):
        raise ValueError(
            f"{task}: {len(examples)} examples but {len(predictions)} predictions; pass one of each"
        )


def _field(example: Example, keys: Sequence[str], task: str, index: int) -> Any:
    for key in keys:
        if key in example and example[key] is not None:
            return example[key]
    raise ValueError(
        f"{task} example {index}: none of the fields {list(keys)} is present (got {sorted(example)})"
    )


def _as_dicts(examples: Sequence[Any]) -> list[Example]:
    """Plain dicts from dicts or dataclass examples (``modern_llm.data.task_datasets.TaskExample``)."""
    out = []
    for i, ex in enumerate(examples):
        if dataclasses.is_dataclass(ex) and not isinstance(ex, type):
            ex = dataclasses.asdict(ex)
        if not isinstance(ex, dict):
            raise ValueError(f"example {i}: expected a dict or a TaskExample, got {type(ex).__name__}")
        out.append(ex)
    return out


class _Collector:
    """Counts per category (in a fixed display order) and the first ``k`` examples of each."""

    def __init__(self, categories: Sequence[str], k: int):
        if k < 0:
            raise ValueError(f"k (examples kept per category) must be >= 0, got {k}")
        self.counts = {c: 0 for c in categories}
        self.examples: dict[str, list[dict[str, Any]]] = {c: [] for c in categories}
        self.k = k

    def add(self, category: str, record: dict[str, Any]) -> None:
        self.counts[category] += 1
        if len(self.examples[category]) < self.k:
            self.examples[category].append(record)


# ---------------------------------------------------------------------------------------------------------------
# SST-2
# ---------------------------------------------------------------------------------------------------------------

SST2_CATEGORIES = ("correct", "negation", "contrast", "other", "unparsed")
# SST-2 is tokenised PTB-style ("does n't", "ca n't"), so n't may stand alone or be glued to the verb.
NEGATION_RE = re.compile(
    r"n't\b|n’t\b|\b(?:not|no|never|nothing|nobody|none|neither|nor|nowhere|without|hardly|barely|scarcely|"
    r"cannot|lack|lacks|lacking|fails?|failed)\b",
    re.IGNORECASE,
)
CONTRAST_RE = re.compile(
    r"\b(?:but|however|although|though|yet|despite|nevertheless|nonetheless|whereas)\b", re.IGNORECASE
)
_LABEL_WORDS = {"1": 1, "positive": 1, "pos": 1, "0": 0, "negative": 0, "neg": 0}


def parse_sentiment(value: Any) -> int | None:
    """1/0 from an int/bool label, "positive"/"negative"/"1"/"0", or generated text naming exactly one label."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value if value in (0, 1) else None
    if not isinstance(value, str):
        return None
    text = value.strip().lower().rstrip(".!")
    if text in _LABEL_WORDS:
        return _LABEL_WORDS[text]
    found = {_LABEL_WORDS[w] for w in re.findall(r"\b(?:positive|negative)\b", text)}
    return found.pop() if len(found) == 1 else None


def sentiment_cue(sentence: str) -> str:
    """'negation', 'contrast' or 'other' (negation wins when both are present)."""
    if NEGATION_RE.search(sentence):
        return "negation"
    if CONTRAST_RE.search(sentence):
        return "contrast"
    return "other"


def analyze_sst2(
    examples: Sequence[Example],
    predictions: Sequence[Any],
    k: int = 5,
    extract: Callable[[Any], int | None] = parse_sentiment,
) -> dict[str, Any]:
    """Sentiment errors by linguistic cue; ``rates[cue]`` = error rate among sentences with that cue."""
    _check_lengths(examples, predictions, "sst2")
    examples = _as_dicts(examples)
    out = _Collector(SST2_CATEGORIES, k)
    per_cue = {c: [0, 0] for c in ("negation", "contrast", "other")}  # cue -> [n, errors]
    for i, (ex, pred) in enumerate(zip(examples, predictions)):
        sentence = str(_field(ex, ("sentence", "text"), "sst2", i))
        label = parse_sentiment(_field(ex, ("label",), "sst2", i))
        if label is None:
            raise ValueError(f"sst2 example {i}: label {ex['label']!r} is not 0/1/positive/negative")
        cue = sentiment_cue(sentence)
        parsed = extract(pred)
        wrong = parsed != label
        per_cue[cue][0] += 1
        per_cue[cue][1] += wrong
        category = "unparsed" if parsed is None else (cue if wrong else "correct")
        record = {"index": i, "sentence": sentence, "label": label, "prediction": pred, "cue": cue}
        match = NEGATION_RE.search(sentence) if cue == "negation" else CONTRAST_RE.search(sentence)
        if match:
            record["cue_word"] = match.group(0)
        out.add(category, record)
    n = len(examples)
    rates = {"overall": (n - out.counts["correct"]) / n if n else 0.0}
    rates |= {cue: errors / total for cue, (total, errors) in per_cue.items() if total}
    support = {cue: total for cue, (total, _) in per_cue.items()}
    return {
        "task": "sst2",
        "n": n,
        "counts": out.counts,
        "examples": out.examples,
        "rates": rates,
        "support": support,
    }


# ---------------------------------------------------------------------------------------------------------------
# Math word problems
# ---------------------------------------------------------------------------------------------------------------

MATH_CATEGORIES = ("correct", "arithmetic_slip", "wrong_plan", "extraction_failure")

_FINAL_ANSWER_RE = re.compile(
    r"####\s*(?P<a>[^\n]*)"
    r"|\\boxed\{(?P<b>[^{}]*)\}"
    r"|(?:final answer|the answer)\s*(?:is|:|=)\s*(?P<c>[^\n]*)"
    r"|^\s*answer\s*:\s*(?P<d>[^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)


def extract_final_answer(text: str) -> str | None:
    """Normalised number after the LAST answer marker ("####", \\boxed{}, "the answer is", "Answer:"), else None."""
    matches = list(_FINAL_ANSWER_RE.finditer(text or ""))
    if not matches:
        return None
    last = matches[-1]
    tail = next(g for g in last.groups() if g is not None)
    return normalize_number(tail)


def reference_answer(example: Example, index: int = 0) -> str:
    """The gold final answer: a ``final_answer``/``target`` field, or the text after "####" in ``answer``."""
    value = _field(example, ("final_answer", "target", "answer", "Answer"), "math", index)
    text = str(value)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text.strip()


@dataclass
class Step:
    """One checkable arithmetic step of a solution."""

    expr: str  # as the calculator sees it
    claimed: str
    ok: bool
    source: str  # "annotation" (<<expr=result>>) or "inline" (a op b = c)


# Characters an inline expression may contain ("x"/"×" multiply, "$" is dropped, "N%" means N/100).
_RUN_CHARS = frozenset("0123456789.,$()+-–−*/x×÷% \t")
_EXPR_START = frozenset("0123456789$(.")
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_PLAIN_CLAIM_RE = re.compile(rf"\$?\s*(?P<num>{_NUMBER})\s*(?P<pct>%)?")
_TIGHT_FRACTION_RE = re.compile(r"(?<![\d./])(\d+(?:\.\d+)?/\d+(?:\.\d+)?)(?![\d./])")
_HAS_OPERATOR_RE = re.compile(r"[\d)]\s*(?:\*\*|//|[-+*/%])\s*[\d(.]")
# Sentence or list punctuation inside a run ("so 8, 8 * 2", "had 5. 3 + 4"): a comma/period before a space.
_BOUNDARY_RE = re.compile(r"[.,](?=\s|$)")
_MIXED_NUMBER_RE = re.compile(r"\s*\$?\d+\s+and\s+\d+/\d+")


def _normalise_symbols(raw: str) -> str:
    expr = raw.replace("$", "").replace("÷", "/").replace("−", "-").replace("–", "-")
    expr = re.sub(r"(?<=[\d)])\s*[x×]\s*(?=[\d(])", "*", expr)  # "3 x 4" but not "3x + 4"
    # A tight fraction is one number: "25 / 1/3" means 25 / (1/3) as written by people.
    return _TIGHT_FRACTION_RE.sub(r"(\1)", expr).strip()


def _percent_to_fraction(expr: str) -> str:
    return re.sub(r"(\d+(?:\.\d+)?)\s*%", r"(\1/100)", expr)  # "200 * 40%": percent of, not modulo


def _value(expr: str) -> Fraction | None:
    try:
        return safe_eval_exact(expr)
    except CalculatorError:
        return None


def _left_expression(run: str) -> str | None:
    """The calculator expression a run of arithmetic characters ending at "=" holds, or None.

    Only the part after the last sentence/list punctuation counts, and it must start the run: when the
    run begins with an operator the real expression continues further left past a word ("200 GB * 40%"),
    and checking just its tail would report false slips.
    """
    parts = _BOUNDARY_RE.split(run)
    body = parts[-1].strip()
    if not body or body[0] not in _EXPR_START:
        return None
    if len(parts) > 1 and parts[-2].rstrip().endswith(tuple("0123456789")) and re.match(r"\d{3}\b", body):
        return None  # "14, 400 / 80": probably a thousands separator followed by a stray space
    if re.search(r"%\s*[\d(]", body):
        return None  # "30/100%1000": "%" used as "percent of", which the calculator reads as modulo
    expr = _normalise_symbols(body)
    if not _HAS_OPERATOR_RE.search(expr):  # a bare number or "40%" is no computation
        return None
    expr = _percent_to_fraction(expr)
    return expr if _value(expr) is not None else None


def _right_claim(run: str, expr: str) -> tuple[str, bool] | None:
    """(claimed text, verdict) for the run after "=", or None when it is not a checkable claim.

    A plain number ("$18", "25%") is checked at its written precision; an expression ("14 / 2", "2/5")
    must have the same value as the left side (a chain "4 * 60 / 5 = 4 * 12 = 48"), or its first number
    must be the left side's value (a running total "2 + 3 = 5 + 1 = 6"). Anything else ("3 1/2", a
    space-grouped "409 500") is ambiguous and skipped.
    """
    segment = _BOUNDARY_RE.split(run)[0].strip()
    plain = _PLAIN_CLAIM_RE.fullmatch(segment)
    if plain is not None:
        claimed = plain.group("num")
        verdict = check_calculation(expr, claimed)
        if verdict is False and plain.group("pct"):  # "1/4 = 25%": the claim may be the value times 100
            verdict = check_calculation(f"({expr})*100", claimed)
        return None if verdict is None else (segment, verdict)
    right = _normalise_symbols(segment)
    right_value, left_value = _value(_percent_to_fraction(right)), _value(expr)
    if right_value is None or left_value is None or not _HAS_OPERATOR_RE.search(right):
        return None
    first = _PLAIN_CLAIM_RE.match(segment)
    same = abs(left_value - right_value) <= Fraction(1, 10**4) * max(1, abs(left_value))
    running_total = first is not None and bool(check_calculation(expr, first.group("num")))
    return segment, same or running_total


def _inline_steps(text: str) -> Iterable[Step]:
    for eq in re.finditer(r"(?<![=<>!])=(?!=)", text):
        start = eq.start()
        while start > 0 and text[start - 1] in _RUN_CHARS:
            start -= 1
        end = eq.end()
        while end < len(text) and text[end] in _RUN_CHARS:
            end += 1
        if start > 0 and not text[start].isspace() and (text[start - 1].isalnum() or text[start - 1] == ":"):
            continue  # glued to a word or a clock time ("Q3 + 4", "6:00+48"): not an arithmetic step
        if _MIXED_NUMBER_RE.match(text, eq.end()):
            continue  # "17/3 = 5 and 2/3": a mixed number the calculator cannot read
        if end < len(text) and text[end].isalpha() and text[end - 1].isdigit():
            continue  # "= 1.2Y": algebra, not a computed result
        expr = _left_expression(text[start : eq.start()])
        claim = _right_claim(text[eq.end() : end], expr) if expr is not None else None
        if claim is not None:
            yield Step(expr, claim[0], claim[1], "inline")


def check_steps(solution: str) -> list[Step]:
    """Every checkable arithmetic step: ``<<expr=result>>`` annotations, then inline "a op b = c" equations."""
    steps: list[Step] = []
    seen: set[tuple[str, str]] = set()

    def keep(step: Step) -> None:
        key = (str(_value(step.expr)), normalize_number(step.claimed) or step.claimed)
        if key not in seen:  # "16 - 3 = <<16-3=13>>13" writes the same step twice
            seen.add(key)
            steps.append(step)

    for expr, claimed in extract_calculations(solution):
        if not claimed:
            continue
        verdict = check_calculation(expr, claimed)
        if verdict is not None:
            keep(Step(expr, claimed, verdict, "annotation"))
    for step in _inline_steps(re.sub(r"<<[^<>]*>>", "", solution)):
        keep(step)
    return steps


def classify_math(
    solution: str, reference: str, extract: Callable[[str], str | None] = extract_final_answer
) -> tuple[str, dict[str, Any]]:
    """(category, evidence) for one generated solution against the gold final answer.

    ``extract`` is the grading rule ("correct" means exactly what the evaluation counts as correct). A wrong
    answer written without any final-answer marker is a format violation (the grader had to guess, e.g. the
    last number) and counts as an extraction failure, whatever its steps look like.
    """
    steps = check_steps(solution)
    wrong = [asdict(s) for s in steps if not s.ok]
    answer = extract(solution)
    marked = extract_final_answer(solution) is not None
    evidence = {"extracted": answer, "format_ok": marked, "n_steps": len(steps), "wrong_steps": wrong}
    if answer is None:
        return "extraction_failure", evidence
    if exact_match(str(answer), reference):
        return "correct", evidence
    if not marked:
        return "extraction_failure", evidence
    return ("arithmetic_slip" if wrong else "wrong_plan"), evidence


def analyze_math(
    examples: Sequence[Example],
    predictions: Sequence[str],
    k: int = 5,
    extract: Callable[[str], str | None] = extract_final_answer,
    task: str = "math",
) -> dict[str, Any]:
    """Math errors: arithmetic slip vs wrong plan vs answer-extraction failure (see module docstring)."""
    _check_lengths(examples, predictions, task)
    examples = _as_dicts(examples)
    out = _Collector(MATH_CATEGORIES, k)
    steps_total = steps_wrong = 0
    for i, (ex, pred) in enumerate(zip(examples, predictions)):
        pred = "" if pred is None else pred  # no generation at all: nothing to extract
        if not isinstance(pred, str):
            raise ValueError(
                f"{task} prediction {i}: expected the generated solution text, got {type(pred).__name__}"
            )
        reference = reference_answer(ex, i)
        category, evidence = classify_math(pred, reference, extract)
        steps_total += evidence["n_steps"]
        steps_wrong += len(evidence["wrong_steps"])
        question = ex.get("question", ex.get("text", ""))
        out.add(
            category,
            {"index": i, "question": question, "reference": reference, "prediction": pred} | evidence,
        )
    return {
        "task": task,
        "n": len(examples),
        "counts": out.counts,
        "examples": out.examples,
        "steps": {"checked": steps_total, "wrong": steps_wrong},
    }


# ---------------------------------------------------------------------------------------------------------------
# SAMSum
# ---------------------------------------------------------------------------------------------------------------

SAMSUM_CATEGORIES = ("ok", "missing_speaker", "hallucinated_entity")
# Capitalised words that start sentences in summaries without naming anyone.
_NOT_ENTITIES = frozenset(
    [
        "the",
        "a",
        "an",
        "he",
        "she",
        "they",
        "it",
        "we",
        "you",
        "his",
        "her",
        "their",
        "its",
        "our",
        "your",
        "there",
        "this",
        "that",
        "these",
        "those",
        "then",
        "when",
        "while",
        "after",
        "before",
        "both",
        "all",
        "everyone",
        "everybody",
        "someone",
        "somebody",
        "nobody",
        "none",
        "one",
        "two",
        "three",
        "some",
        "each",
        "either",
        "neither",
        "in",
        "on",
        "at",
        "as",
        "but",
        "and",
        "or",
        "so",
        "if",
        "because",
        "since",
        "also",
        "however",
        "meanwhile",
        "later",
        "finally",
        "today",
        "tomorrow",
        "yesterday",
        "tonight",
        "next",
        "last",
        "first",
        "what",
        "who",
        "why",
        "how",
        "where",
        "which",
        "now",
        "soon",
        "there's",
        "it's",
        "ok",
        "okay",
        "yes",
        "no",
        "not",
        "to",
        "for",
        "of",
        "with",
        "from",
        "by",
        "about",
        "after",
        "during",
        "instead",
        "otherwise",
        "according",
        "afterwards",
        "many",
        "several",
        "sometimes",
        "do",
        "does",
        "did",
        "is",
        "are",
        "was",
        "were",
        "will",
        "would",
        "can",
        "could",
        "should",
        "has",
        "have",
        "had",
        "let",
    ]
)
_CLITIC_RE = re.compile(r"(?:n['’]t|['’](?:s|ll|re|ve|d|m))$", re.IGNORECASE)  # "They'll" -> "They"
_SPEAKER_RE = re.compile(r"^\s*([^:\n\r]{1,40}?)\s*:", re.MULTILINE)
_WORD_RE = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")


def dialogue_speakers(dialogue: str) -> list[str]:
    """Speaker names ("Name: text" line prefixes) in order of first appearance."""
    seen: dict[str, None] = {}
    for name in _SPEAKER_RE.findall(dialogue):
        if any(ch.isalpha() for ch in name) and not name.startswith(("http", "<")):
            seen.setdefault(name.strip(), None)
    return list(seen)


def _words(text: str) -> set[str]:
    """Lower-cased words with possessive 's and clitics removed ("Betty's" -> "betty", "she'll" -> "she")."""
    return {_CLITIC_RE.sub("", w).lower() for w in _WORD_RE.findall(text)}


def _mentions(name: str, words: set[str]) -> bool:
    first = _words(name.split()[0]) if name.split() else set()
    return bool(first) and first <= words


def capitalised_words(text: str) -> list[str]:
    """Candidate entity words: capitalised, 2+ letters, not a sentence-initial function word; in order."""
    found: dict[str, None] = {}
    for w in _WORD_RE.findall(text):
        base = _CLITIC_RE.sub("", w)
        if len(base) >= 2 and base[0].isupper() and base.lower() not in _NOT_ENTITIES:
            found.setdefault(base, None)
    return list(found)


def analyze_samsum(
    examples: Sequence[Example],
    predictions: Sequence[str],
    k: int = 5,
    extract: Callable[[Any], str] = lambda p: "" if p is None else str(p),
) -> dict[str, Any]:
    """Summary errors: dropped speakers and invented names (flags may overlap; see module docstring)."""
    _check_lengths(examples, predictions, "samsum")
    examples = _as_dicts(examples)
    out = _Collector(SAMSUM_CATEGORIES, k)
    for i, (ex, pred) in enumerate(zip(examples, predictions)):
        dialogue = str(_field(ex, ("dialogue", "text"), "samsum", i))
        reference = str(_field(ex, ("summary", "reference", "answer"), "samsum", i))
        pred = extract(pred)
        ref_words, pred_words, source_words = (
            _words(reference),
            _words(pred),
            _words(dialogue + " " + reference),
        )
        speakers = dialogue_speakers(dialogue)
        missing = [s for s in speakers if _mentions(s, ref_words) and not _mentions(s, pred_words)]
        invented = [w for w in capitalised_words(pred) if w.lower() not in source_words]
        record = {"index": i, "dialogue": dialogue, "reference": reference, "prediction": pred}
        record |= {"speakers": speakers, "missing_speakers": missing, "hallucinated": invented}
        if missing:
            out.add("missing_speaker", record)
        if invented:
            out.add("hallucinated_entity", record)
        if not missing and not invented:
            out.add("ok", record)
    return {"task": "samsum", "n": len(examples), "counts": out.counts, "examples": out.examples}


# ---------------------------------------------------------------------------------------------------------------
# Dispatch, files, CLI
# ---------------------------------------------------------------------------------------------------------------

MATH_TASKS = ("gsm8k", "svamp", "mawps", "asdiv-a", "arithmetic")
_ALIASES = {"sst-2": "sst2", "asdiv": "asdiv-a", "synthetic": "arithmetic", "math": "gsm8k"}


def analyze(task: str, examples: Sequence[Any], predictions: Sequence[Any], k: int = 5) -> dict[str, Any]:
    """Analyse ``task`` (sst2 | samsum | gsm8k | svamp | mawps | asdiv-a | arithmetic) with the task's own
    answer extraction from ``modern_llm.data.task_datasets``, so "correct" here is exactly what the
    evaluation scored as correct."""
    from modern_llm.data.task_datasets import get_task

    key = _ALIASES.get(task.strip().lower(), task.strip().lower())
    if key not in ("sst2", "samsum", *MATH_TASKS):
        raise ValueError(f"no error analysis for task {task!r}; known: sst2, samsum, {', '.join(MATH_TASKS)}")
    extract = get_task(key).extract_answer
    if key == "sst2":
        return analyze_sst2(examples, predictions, k, extract=extract)
    if key == "samsum":
        return analyze_samsum(examples, predictions, k, extract=extract)
    return analyze_math(examples, predictions, k, extract=extract, task=key)


def plot_counts(result: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of the category counts, each bar labelled with its count."""
    counts = result["counts"]
    fig = Figure(figsize=(1.4 * len(counts) + 2.5, 3.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(list(counts), list(counts.values()), color="tab:blue")
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel("examples")
    ax.set_title(f"{result['task']}: error categories (n={result['n']})", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    return path


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    n = result["n"]
    metrics: dict[str, Any] = {f"n_{c}": v for c, v in result["counts"].items()}
    metrics |= {f"frac_{c}": (v / n if n else 0.0) for c, v in result["counts"].items()}
    for extra in ("rates", "steps", "support"):
        if extra in result:
            metrics[extra] = result[extra]
    return metrics


def write_analysis(
    result: dict[str, Any],
    out_dir: str | Path,
    name: str,
    *,
    model: str = "unknown",
    source: str = "",
    started: Any = None,
    duration_s: float = 0.0,
    log_path: str | Path | None = "experiments/LOG.md",
) -> dict[str, Path]:
    """Write ``<name>.json`` (result record: counts/fractions as metrics), ``<name>_examples.json`` (the
    categorised examples) and ``<name>.png`` (bar chart) into ``out_dir``; append to the experiment log
    unless ``log_path`` is None. Returns the written paths by kind."""
    from modern_llm.utils.records import append_log, current_command, now_iso, write_record

    out_dir = Path(out_dir)
    record = write_record(
        out_dir / f"{name}.json",
        name=name,
        task=result["task"],
        model=model,
        metrics=_metrics(result),
        protocol={"analysis": "error-categories", "n_examples": result["n"], "source": source},
        seed=None,
        device="cpu",
        dtype="n/a",
        started=started or now_iso(),
        duration_s=duration_s,
    )
    examples = out_dir / f"{name}_examples.json"
    examples.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n")
    figure = plot_counts(result, out_dir / f"{name}.png")
    paths = {"record": record, "examples": examples, "figure": figure}
    if log_path is not None:
        counts = ", ".join(f"{c}={v}" for c, v in result["counts"].items())
        paths["log"] = append_log(
            f"error analysis: {name}",
            f"{result['task']} error categories of {model} on {result['n']} predictions ({source or 'n/a'})",
            current_command(),
            f"{counts}; files {record.name}, {figure.name}",
            "categories are heuristic (see modern_llm.evaluation.analysis); read the saved examples before "
            "drawing conclusions",
            path=log_path,
        )
    return paths


def read_predictions(path: str | Path, default_task: str | None = None) -> dict[str, tuple[list, list]]:
    """JSONL rows {"task", <example fields> | "example": {...}, "prediction"} -> {task: (examples, preds)}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    groups: dict[str, tuple[list, list]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
            if not isinstance(row, dict) or "prediction" not in row:
                raise ValueError(f"{path}:{lineno}: each line must be an object with a 'prediction' field")
            task = row.get("task") or default_task
            if not task:
                raise ValueError(f"{path}:{lineno}: no 'task' field; add it or pass --task")
            example = row["example"] if isinstance(row.get("example"), dict) else row
            example = {k: v for k, v in example.items() if k not in ("task", "prediction")}
            examples, preds = groups.setdefault(str(task), ([], []))
            examples.append(example)
            preds.append(row["prediction"])
    if not groups:
        raise ValueError(f"{path}: no predictions in the file")
    return groups


def join_predictions_by_id(
    path: str | Path, task: str | None, split: str, field: str = "output", data_dir: str | None = None
) -> dict[str, tuple[list, list]]:
    """Rows {"id", <field>} + the task's own examples (matched by id) -> {task: (examples, preds)}."""
    from modern_llm.data.task_datasets import get_task

    if not task:
        raise ValueError("--join-split needs --task (which dataset the ids belong to)")
    by_id = {ex.id: ex for ex in get_task(task).load(split, data_dir=data_dir)}
    examples, preds = [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("id") not in by_id or field not in row:
                raise ValueError(f"{path}:{lineno}: needs an 'id' from {task}/{split} and a '{field}' field")
            examples.append(by_id[row["id"]])
            preds.append(row[field])
    if not examples:
        raise ValueError(f"{path}: no predictions in the file")
    return {task: (examples, preds)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="error-analysis",
        description="Categorise prediction errors (SST-2 negation/contrast, math slip/plan/extraction, SAMSum "
        "missing speaker/hallucinated entity) and write counts, examples and a bar chart.",
    )
    p.add_argument("--predictions", required=True, help="JSONL: task, example fields, prediction per line")
    p.add_argument("--out-dir", default="experiments/analysis")
    p.add_argument("--name", help="output name (default: the predictions file stem [+ -task])")
    p.add_argument("--task", help="task for rows without a 'task' field")
    p.add_argument("--model", default="unknown", help="model name recorded in the result")
    p.add_argument("-k", "--examples-per-category", type=int, default=5)
    p.add_argument(
        "--join-split",
        help="rows hold only an 'id' and an output (as hf-finetune/prompt-baseline write them): join them by id "
        "with this split of --task's dataset (e.g. validation, test)",
    )
    p.add_argument("--prediction-field", default="prediction", help="row field holding the model output")
    p.add_argument("--data-dir", help="datasets root for --join-split (default: $MODERN_LLM_DATA_DIR)")
    p.add_argument("--no-log", action="store_true", help="do not append to experiments/LOG.md")
    p.add_argument("--log-path", default="experiments/LOG.md")
    return p


def main(argv: list[str] | None = None) -> int:
    from modern_llm.utils.records import now_iso

    args = build_parser().parse_args(argv)
    started, t0 = now_iso(), time.time()
    if args.join_split:
        groups = join_predictions_by_id(
            args.predictions, args.task, args.join_split, args.prediction_field, args.data_dir
        )
    else:
        groups = read_predictions(args.predictions, args.task)
    base = args.name or Path(args.predictions).stem
    for task, (examples, preds) in groups.items():
        result = analyze(task, examples, preds, args.examples_per_category)
        name = base if len(groups) == 1 else f"{base}-{task}"
        paths = write_analysis(
            result,
            args.out_dir,
            name,
            model=args.model,
            source=str(args.predictions),
            started=started,
            duration_s=time.time() - t0,
            log_path=None if args.no_log else args.log_path,
        )
        print(f"{task} (n={result['n']}): {result['counts']} -> {paths['record']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
