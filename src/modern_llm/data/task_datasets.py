"""Downstream tasks: each one is data + prompt format + answer extraction + grading, in one place.

A ``Task`` is used unchanged by finetuning, prompting baselines, alignment (pairs, rewards) and test-time
compute, so "what counts as correct" is defined exactly once per task:

- ``load(split, data_dir=None, limit=None) -> list[TaskExample]``
- ``render_prompt(example, shots=(), chat=False, tokenizer=None) -> str`` (zero/k-shot, optional chat template)
- ``target_text(example)``: what supervised finetuning trains on; ``sft_pair`` joins prompt and completion
- ``seq2seq_source(example)``: the encoder input for T5-style models (T5's own task prefixes)
- ``extract_answer(text)``, ``is_correct(pred, example)``, ``reward(pred, example)``, ``score(preds, examples)``

Tasks (``get_task(name)``; ``TASKS`` is a plain dict)
- ``sst2``: binary sentiment (GLUE SST-2). Splits train / validation (GLUE test labels are not public).
  Answer = label 0/1, shown to models as "negative"/"positive". Score: accuracy, F1 (positive = 1).
- ``samsum``: dialogue summarisation. Score: ROUGE-1/2/L F (rouge-score, stemming). Locally only "test"
  exists; a run that trains on it must say so (see /shared/data/samsum/SOURCE.md).
- ``gsm8k``: grade-school math with worked solutions ending ``#### <answer>``. Score: exact match.
- ``svamp``: 1,000 one-step/two-step problems, an evaluation set; split "test" is all of them.
- ``mawps``, ``asdiv-a``: the SVAMP paper's 5-fold CV splits. Numbers in the files are masked as
  ``number0``, ``number1``, ... with the values in a "Numbers" column; we substitute them back and turn the
  prefix-notation equation into a one-line infix solution ("56 * 9 = 504"). Split "train"/"dev" of
  ``fold`` (default 0), or "fold3/dev". "test" means "dev" (what the SVAMP paper evaluates on).
- ``arithmetic``: the project's synthetic multi-step word problems (``modern_llm.data.synthetic``), generated
  on the fly; splits train/validation/test use seeds seed, seed+1, seed+2.

Data location: ``data_dir`` argument > ``$MODERN_LLM_DATA_DIR`` > Hugging Face Hub (``datasets.load_dataset``).
``data_dir`` may be the root holding ``sst2/``, ``gsm8k/``, ... or the task's own folder. When a local root is
set but lacks the task, FileNotFoundError names the folder looked in and the Hub id to use instead.

Prompt formats (one per task, shared by zero-shot, k-shot and finetuning)
- plain: ``<instruction>\\n\\n`` + k shots ``<body> <target>\\n\\n`` + ``<body>``, where body ends with a cue
  ("Sentiment:", "Answer:", "Summary:"); the completion is " " + target.
- chat: the tokenizer's chat template; shots become user/assistant turns, the instruction opens the first
  user turn, and the completion is the bare target (the collator appends EOS = end of turn for most
  templates).

Answer extraction (math), in order: text after the first ``####``; the first number after "answer is" /
"answer:" / ``\\boxed{``; else the last number in the text. Numbers go through
``evaluation.metrics.normalize_number`` ("$1,234.50" -> "1234.5"). Generations are first cut at the
task's stop sequences (a model continuing with a new "Question:" must not have that question's numbers read).

Collators (all return the Hugging Face batch convention: ``labels`` aligned with ``input_ids``, -100 = ignored;
HF causal models shift internally)
- ``CausalLMCollator``: prompt + completion + EOS, right-padded; prompt tokens and padding are -100 in labels,
  so SFT learns only the completion. Over-long pairs lose the *start* of the prompt first.
- ``Seq2SeqCollator``: encoder ``input_ids`` from the source, ``labels`` from the target, padding -> -100.
- ``VerbalizerCollator`` + ``verbalizer_logits``: classification with an LM head, by comparing the next-token
  logits of the label words' first tokens at the last prompt position.
- ``ClassificationCollator``: text + integer label for a sequence-classification head.

Footguns
- Prompt and completion are tokenised separately (so the label mask boundary is exact); the completion
  therefore starts with its own leading space in plain format, and BPE never merges across the boundary.
- A chat-templated prompt already contains BOS where the template wants it; the causal collator drops a
  doubled BOS that ``add_special_tokens`` would add in front of it.
- SST-2's "positive"/"negative" extraction takes the first of the two words in the text; SAMSum's
  ``is_correct`` is ROUGE-L F >= 0.5, a convention for building preference pairs only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from modern_llm.evaluation import metrics

# ---------------------------------------------------------------------------------------------------------------
# Examples, shots and data location
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskExample:
    """One task instance, normalised across sources.

    ``text`` is the input (review, dialogue, problem). ``answer`` is the gold answer as a string (canonical
    number for math, "positive"/"negative" for SST-2, the reference summary for SAMSum). ``label`` is the class
    id for classification tasks. ``solution`` is a worked solution ending in ``#### <answer>`` for math.
    """

    id: str
    text: str
    answer: str
    label: int | None = None
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def pick_shots(
    pool: Sequence[TaskExample], k: int, seed: int = 0, exclude: TaskExample | None = None
) -> list[TaskExample]:
    """``k`` demonstration examples drawn from ``pool`` without replacement (never ``exclude`` itself)."""
    if k < 0:
        raise ValueError(f"number of shots k={k} must be >= 0")
    candidates = [ex for ex in pool if exclude is None or ex.id != exclude.id]
    if k > len(candidates):
        raise ValueError(f"asked for {k} shots but the pool has only {len(candidates)} usable examples")
    return random.Random(seed).sample(candidates, k)


def _local_root(data_dir: str | Path | None) -> Path | None:
    from modern_llm.data.lm_datasets import resolve_data_dir  # one rule for "where is the data" project-wide

    return resolve_data_dir(data_dir)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _apply_limit(examples: list[TaskExample], limit: int | None) -> list[TaskExample]:
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} must be >= 0 or None")
    return examples if limit is None else examples[:limit]


def _number_ids(examples: list[TaskExample], split: str) -> list[TaskExample]:
    """Give examples without a source id the id '<split>-<index>' (stable: rows are read in file order)."""
    return [ex if ex.id else dataclasses.replace(ex, id=f"{split}-{i}") for i, ex in enumerate(examples)]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
    return rows


def _require(row: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; found {sorted(row)}")


# ---------------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------------

# A number as people write it: optional sign and currency, thousands groups, decimals, a simple fraction.
_NUMBER_TOKEN = re.compile(
    r"[-\u2212]?\$?\s*(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
)
_ANSWER_MARKERS = re.compile(r"answer\s*(?:is|:)|\\boxed\{", re.IGNORECASE)


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop sequence (all of it when none occurs)."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def _first_number(text: str) -> str | None:
    match = _NUMBER_TOKEN.search(text)
    return metrics.normalize_number(match.group(0)) if match else None


def extract_number_answer(text: str | None, stops: Sequence[str] = ()) -> str | None:
    """Canonical final number of a math answer (see module docstring for the order of rules), or None."""
    if text is None:
        return None
    text = truncate_at_stops(str(text), stops)
    hashes = text.find("####")
    if hashes != -1:
        found = _first_number(text[hashes + 4 :])
        if found is not None:
            return found
    marker = _ANSWER_MARKERS.search(text)
    if marker is not None:
        found = _first_number(text[marker.end() :])
        if found is not None:
            return found
    return metrics.normalize_number(text)


# ---------------------------------------------------------------------------------------------------------------
# The task base class
# ---------------------------------------------------------------------------------------------------------------


class Task:
    """Shared machinery; subclasses set the class attributes and implement the row/format hooks."""

    name: ClassVar[str]
    folder: ClassVar[str]  # sub-folder of the data root
    hub_id: ClassVar[str | None]  # None: no faithful Hub copy
    hub_config: ClassVar[str | None] = None
    splits: ClassVar[tuple[str, ...]]
    train_split: ClassVar[str]
    eval_split: ClassVar[str]
    instruction: ClassVar[str]
    cue: ClassVar[str]  # ends the plain-format body; the completion follows after a space
    stop_sequences: ClassVar[tuple[str, ...]] = ()
    max_new_tokens: ClassVar[int] = 128
    kind: ClassVar[str] = "generation"  # "classification" | "generation" | "math"

    # ----- loading -----

    def load(
        self, split: str | None = None, data_dir: str | Path | None = None, limit: int | None = None
    ) -> list[TaskExample]:
        """Examples of ``split`` (default ``eval_split``) from the local folder, else from the Hub."""
        split = split or self.eval_split
        self._check_split(split)
        root = _local_root(data_dir)
        if root is None:
            return _apply_limit(self._load_hub(split), limit)
        folder = self._task_folder(root)
        return _apply_limit(self._load_local(folder, split), limit)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {split!r}; use one of {list(self.splits)}")

    def _hub_hint(self) -> str:
        if self.hub_id is None:
            return "this dataset has no faithful Hub copy (see the task's docstring for where to get it)"
        config = f" (config {self.hub_config!r})" if self.hub_config else ""
        return (
            f"or unset --data-dir/MODERN_LLM_DATA_DIR to download Hub dataset {self.hub_id!r}{config} online"
        )

    def _task_folder(self, root: Path) -> Path:
        for candidate in (root / self.folder, root):
            if candidate.is_dir() and self._looks_like_task_folder(candidate):
                return candidate
        raise FileNotFoundError(
            f"{self.name} data not found: looked in {root / self.folder} (and {root} itself). "
            f"Put the files there, point --data-dir/MODERN_LLM_DATA_DIR at the folder holding "
            f"{self.folder}/, {self._hub_hint()}."
        )

    def _looks_like_task_folder(self, folder: Path) -> bool:
        return any(self._local_file(folder, s).is_file() for s in self.splits)

    def _local_file(self, folder: Path, split: str) -> Path:
        raise NotImplementedError

    def _load_local(self, folder: Path, split: str) -> list[TaskExample]:
        path = self._local_file(folder, split)
        if not path.is_file():
            present = [s for s in self.splits if self._local_file(folder, s).is_file()]
            raise FileNotFoundError(
                f"{self.name}: split {split!r} not found locally ({path} does not exist; present: {present}). "
                f"{_sentence(self._hub_hint())}."
            )
        rows = self._read_rows(path)
        examples = [self._from_row(row, f"{path}:{i + 1}") for i, row in enumerate(rows)]
        return _number_ids(examples, self._id_prefix(split))

    def _id_prefix(self, split: str) -> str:
        """Prefix of generated example ids: the split, spelled canonically (aliases give the same ids)."""
        return split

    def _read_rows(self, path: Path) -> list[dict]:
        return _read_jsonl(path)

    def _hub_split(self, split: str) -> str:
        return split

    def _load_hub(self, split: str) -> list[TaskExample]:
        if self.hub_id is None:
            raise FileNotFoundError(
                f"{self.name}: no local data (pass --data-dir or set MODERN_LLM_DATA_DIR to the folder holding "
                f"{self.folder}/) and {self._hub_hint()}."
            )
        import datasets

        try:
            rows = datasets.load_dataset(self.hub_id, self.hub_config, split=self._hub_split(split))
        except Exception as err:  # offline, missing id, ...: say what was tried and how to fix it
            raise FileNotFoundError(
                f"{self.name}: no local data dir given (--data-dir / MODERN_LLM_DATA_DIR unset) and loading Hub "
                f"dataset {self.hub_id!r} split {split!r} failed ({type(err).__name__}: {err}). Point "
                f"--data-dir at a folder holding {self.folder}/, or go online."
            ) from err
        return _number_ids(
            [self._from_row(dict(row), f"{self.hub_id}[{i}]") for i, row in enumerate(rows)], split
        )

    def _from_row(self, row: dict, where: str) -> TaskExample:
        raise NotImplementedError

    # ----- prompts -----

    def body(self, example: TaskExample) -> str:
        """The plain-format input block, ending with ``cue``."""
        raise NotImplementedError

    def chat_user_text(self, example: TaskExample) -> str:
        """The user turn for chat format (the body without its trailing cue)."""
        text = self.body(example)
        return text[: -len(self.cue)].rstrip() if text.endswith(self.cue) else text

    def target_text(self, example: TaskExample) -> str:
        """What finetuning teaches the model to produce (no leading space)."""
        raise NotImplementedError

    def seq2seq_source(self, example: TaskExample) -> str:
        """Encoder input for T5-style models (defaults to the plain zero-shot prompt)."""
        return self.render_prompt(example)

    def render_prompt(
        self,
        example: TaskExample,
        shots: Sequence[TaskExample] = (),
        chat: bool = False,
        tokenizer: Any = None,
    ) -> str:
        """Zero-shot (no ``shots``) or k-shot prompt; ``chat=True`` applies ``tokenizer``'s chat template."""
        if chat:
            return self._render_chat(example, shots, tokenizer)
        parts = [self.instruction]
        parts += [f"{self.body(shot)} {self.target_text(shot)}" for shot in shots]
        parts.append(self.body(example))
        return "\n\n".join(parts)

    def chat_messages(self, example: TaskExample, shots: Sequence[TaskExample] = ()) -> list[dict[str, str]]:
        """User/assistant turns: the instruction opens the first user turn; shots are answered turns."""
        messages: list[dict[str, str]] = []
        for i, item in enumerate([*shots, example]):
            user = self.chat_user_text(item)
            messages.append({"role": "user", "content": f"{self.instruction}\n\n{user}" if i == 0 else user})
            if i < len(shots):
                messages.append({"role": "assistant", "content": self.target_text(item)})
        return messages

    def _render_chat(self, example: TaskExample, shots: Sequence[TaskExample], tokenizer: Any) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"{self.name}: chat=True needs a tokenizer with a chat template (tokenizer.chat_template); "
                "pass tokenizer=... or use chat=False for the plain format"
            )
        messages = self.chat_messages(example, shots)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def sft_pair(
        self,
        example: TaskExample,
        shots: Sequence[TaskExample] = (),
        chat: bool = False,
        tokenizer: Any = None,
    ) -> dict[str, str]:
        """``{"prompt", "completion"}`` for ``CausalLMCollator``: plain completions start with a space."""
        prompt = self.render_prompt(example, shots, chat=chat, tokenizer=tokenizer)
        target = self.target_text(example)
        return {"prompt": prompt, "completion": target if chat else f" {target}"}

    def sft_records(
        self, examples: Sequence[TaskExample], chat: bool = False, tokenizer: Any = None
    ) -> list[dict[str, str]]:
        """Zero-shot SFT pairs for a list of examples (a list is a valid map-style dataset)."""
        return [self.sft_pair(ex, chat=chat, tokenizer=tokenizer) for ex in examples]

    def seq2seq_records(self, examples: Sequence[TaskExample]) -> list[dict[str, str]]:
        """``{"source", "target"}`` pairs for ``Seq2SeqCollator``."""
        return [{"source": self.seq2seq_source(ex), "target": self.target_text(ex)} for ex in examples]

    # ----- grading -----

    def extract_answer(self, text: Any) -> Any:
        raise NotImplementedError

    def is_correct(self, pred: Any, example: TaskExample) -> bool:
        raise NotImplementedError

    def reward(self, pred: Any, example: TaskExample) -> float:
        """Scalar reward in [0, 1] for preference pairs/reranking: 1.0 if correct else 0.0."""
        return float(self.is_correct(pred, example))

    def score(self, preds: Sequence[Any], examples: Sequence[TaskExample]) -> dict[str, float]:
        raise NotImplementedError

    @staticmethod
    def _check_lengths(preds: Sequence[Any], examples: Sequence[TaskExample]) -> None:
        if len(preds) != len(examples):
            raise ValueError(f"score: {len(preds)} predictions for {len(examples)} examples")
        if not examples:
            raise ValueError("score: no examples to score")


# ---------------------------------------------------------------------------------------------------------------
# SST-2
# ---------------------------------------------------------------------------------------------------------------


class SST2Task(Task):
    """Binary sentiment of movie-review sentences. Local: ``sst2/{train,validation}.tsv``."""

    name = "sst2"
    folder = "sst2"
    hub_id = "nyu-mll/glue"
    hub_config = "sst2"
    splits = ("train", "validation")
    train_split = "train"
    eval_split = "validation"
    instruction = "Classify the sentiment of the movie review as positive or negative."
    cue = "Sentiment:"
    stop_sequences = ("\n",)
    max_new_tokens = 3
    kind = "classification"
    label_words: ClassVar[tuple[str, str]] = ("negative", "positive")  # index = label id
    _LABEL_RE = re.compile(r"\b(positive|negative)\b", re.IGNORECASE)

    def _local_file(self, folder: Path, split: str) -> Path:
        return folder / f"{split}.tsv"

    def _read_rows(self, path: Path) -> list[dict]:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if reader.fieldnames is None or not {"sentence", "label"} <= set(reader.fieldnames):
                raise ValueError(
                    f"{path}: expected a TSV header 'sentence<TAB>label', got {reader.fieldnames}"
                )
            return list(reader)

    def _from_row(self, row: dict, where: str) -> TaskExample:
        _require(row, ("sentence", "label"), where)
        try:
            label = int(row["label"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: label {row['label']!r} is not 0 or 1") from err
        if label not in (0, 1):
            raise ValueError(f"{where}: label {label} is not 0 or 1 (GLUE test rows have label -1: no gold)")
        ident = str(row["idx"]) if "idx" in row else ""
        return TaskExample(ident, row["sentence"].strip(), self.label_words[label], label=label)

    def body(self, example: TaskExample) -> str:
        return f"Review: {example.text}\n{self.cue}"

    def chat_user_text(self, example: TaskExample) -> str:
        return f"Review: {example.text}\nAnswer with one word: positive or negative."

    def target_text(self, example: TaskExample) -> str:
        return self.label_words[example.label]

    def seq2seq_source(self, example: TaskExample) -> str:
        return f"sst2 sentence: {example.text}"  # T5's own GLUE prefix

    def extract_answer(self, text: Any) -> int | None:
        """0/1 from the first "negative"/"positive" in the text; ints 0/1 pass through; else None."""
        if isinstance(text, bool) or text is None:
            return None
        if isinstance(text, int):
            return text if text in (0, 1) else None
        match = self._LABEL_RE.search(str(text))
        return None if match is None else self.label_words.index(match.group(1).lower())

    def is_correct(self, pred: Any, example: TaskExample) -> bool:
        return self.extract_answer(pred) == example.label

    def score(self, preds: Sequence[Any], examples: Sequence[TaskExample]) -> dict[str, float]:
        self._check_lengths(preds, examples)
        extracted = [self.extract_answer(p) for p in preds]
        predicted = [-1 if e is None else e for e in extracted]  # unparseable: wrong, and not "positive"
        gold = [ex.label for ex in examples]
        return {
            "accuracy": metrics.accuracy(predicted, gold),
            "f1": metrics.f1_score(predicted, gold, positive=1),
            "invalid_rate": sum(e is None for e in extracted) / len(extracted),
            "n": float(len(examples)),
        }


# ---------------------------------------------------------------------------------------------------------------
# SAMSum
# ---------------------------------------------------------------------------------------------------------------


class SAMSumTask(Task):
    """Dialogue summarisation. Local: ``samsum/{split}.jsonl`` rows {"id", "dialogue", "summary"}."""

    name = "samsum"
    folder = "samsum"
    hub_id = "knkarthick/samsum"
    splits = ("train", "validation", "test")
    train_split = "train"
    eval_split = "test"
    instruction = "Summarize the dialogue in one or two sentences."
    cue = "Summary:"
    stop_sequences = ("\n\n", "\nDialogue:")
    max_new_tokens = 96
    match_threshold: ClassVar[float] = 0.5

    def _local_file(self, folder: Path, split: str) -> Path:
        return folder / f"{split}.jsonl"

    def _from_row(self, row: dict, where: str) -> TaskExample:
        _require(row, ("dialogue", "summary"), where)
        dialogue = row["dialogue"].replace("\r\n", "\n").strip()
        return TaskExample(str(row.get("id", "")), dialogue, row["summary"].strip())

    def body(self, example: TaskExample) -> str:
        return f"Dialogue:\n{example.text}\n{self.cue}"

    def target_text(self, example: TaskExample) -> str:
        return example.answer

    def seq2seq_source(self, example: TaskExample) -> str:
        return f"summarize: {example.text}"  # T5's own summarisation prefix

    def extract_answer(self, text: Any) -> str:
        return truncate_at_stops(str(text or ""), self.stop_sequences).strip()

    def reward(self, pred: Any, example: TaskExample) -> float:
        """ROUGE-L F of the summary against the reference."""
        return metrics.rouge([self.extract_answer(pred)], [example.answer])["rougeL"]

    def is_correct(self, pred: Any, example: TaskExample) -> bool:
        return self.reward(pred, example) >= self.match_threshold

    def score(self, preds: Sequence[Any], examples: Sequence[TaskExample]) -> dict[str, float]:
        self._check_lengths(preds, examples)
        summaries = [self.extract_answer(p) for p in preds]
        return {**metrics.rouge(summaries, [ex.answer for ex in examples]), "n": float(len(examples))}


# ---------------------------------------------------------------------------------------------------------------
# Math word problems
# ---------------------------------------------------------------------------------------------------------------

_CALC_ANNOTATION = re.compile(r"<<[^<>]*>>")


def strip_calculator_annotations(solution: str) -> str:
    """Remove GSM8K's ``<<a+b=c>>`` calculator annotations."""
    return _CALC_ANNOTATION.sub("", solution)


def _canonical(value: Any, where: str) -> str:
    number = metrics.normalize_number(str(value))
    if number is None:
        raise ValueError(f"{where}: answer {value!r} is not a number")
    return number


class MathTask(Task):
    """Shared prompt/grading for word problems; the answer is a number compared canonically."""

    instruction = (
        "Solve the math word problem. Show your steps, then give the final answer as '#### <number>'."
    )
    cue = "Answer:"
    stop_sequences = ("\nQuestion:", "\n\n\n")
    max_new_tokens = 256
    kind = "math"

    def __init__(self, keep_calculator_annotations: bool = True):
        self.keep_calculator_annotations = keep_calculator_annotations

    def body(self, example: TaskExample) -> str:
        return f"Question: {example.text}\n{self.cue}"

    def target_text(self, example: TaskExample) -> str:
        solution = example.solution or f"#### {example.answer}"
        return solution if self.keep_calculator_annotations else strip_calculator_annotations(solution)

    def seq2seq_source(self, example: TaskExample) -> str:
        return f"question: {example.text}"

    def extract_answer(self, text: Any) -> str | None:
        return extract_number_answer(None if text is None else str(text), self.stop_sequences)

    def is_correct(self, pred: Any, example: TaskExample) -> bool:
        answer = self.extract_answer(pred)
        return answer is not None and answer == metrics.normalize_number(example.answer)

    def steps_valid(self, text: Any) -> bool | None:
        """Whether every checkable arithmetic step ("a + b = c", ``<<a+b=c>>``) in ``text`` is right.

        None when there is nothing to check. A right final answer reached through wrong arithmetic
        ("8 - 9 = 1 ... #### 1") is a lucky guess: preference pairs and verifier labels can require both
        (``strict`` grading in the alignment pipeline) so the policy is not taught the wrong steps.
        """
        from modern_llm.evaluation.analysis import check_steps

        steps = check_steps(truncate_at_stops(str(text), self.stop_sequences))
        return None if not steps else all(step.ok for step in steps)

    def score(self, preds: Sequence[Any], examples: Sequence[TaskExample]) -> dict[str, float]:
        self._check_lengths(preds, examples)
        answers = [self.extract_answer(p) for p in preds]
        correct = [
            a is not None and a == metrics.normalize_number(ex.answer) for a, ex in zip(answers, examples)
        ]
        return {
            "accuracy": sum(correct) / len(correct),
            "no_answer_rate": sum(a is None for a in answers) / len(answers),
            "n": float(len(examples)),
        }


class GSM8KTask(MathTask):
    """GSM8K. Local: ``gsm8k/{train,test}.jsonl`` rows {"question", "answer" (solution ending '#### N')}."""

    name = "gsm8k"
    folder = "gsm8k"
    hub_id = "openai/gsm8k"
    hub_config = "main"
    splits = ("train", "test")
    train_split = "train"
    eval_split = "test"

    def _local_file(self, folder: Path, split: str) -> Path:
        return folder / f"{split}.jsonl"

    def _from_row(self, row: dict, where: str) -> TaskExample:
        _require(row, ("question", "answer"), where)
        solution = row["answer"].strip()
        final = extract_number_answer(solution[solution.rfind("####") :]) if "####" in solution else None
        if final is None:
            raise ValueError(f"{where}: GSM8K answer has no '#### <number>' line: {solution[-60:]!r}")
        return TaskExample("", row["question"].strip(), final, solution=solution)


def _svamp_equation_to_text(equation: str) -> str:
    """'( 76.0 - 25.0 )' -> '76 - 25' (numbers canonical, outer brackets and inner padding removed)."""
    text = re.sub(r"\d+(?:\.\d+)?", lambda m: metrics.normalize_number(m.group(0)) or m.group(0), equation)
    text = re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", " ".join(text.split())))
    if text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]):
        text = text[1:-1]
    return text


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


class SVAMPTask(MathTask):
    """SVAMP (evaluation set). Local: ``svamp/SVAMP.json``, a list of {"ID","Body","Question","Equation","Answer"}.

    Hub fallback ``ChilleD/SVAMP`` splits the same 1,000 problems 700/300; split "test" asks it for both.
    """

    name = "svamp"
    folder = "svamp"
    hub_id = "ChilleD/SVAMP"
    splits = ("test",)
    train_split = "test"  # there is no train split: k-shot demonstrations come from other problems
    eval_split = "test"

    def _local_file(self, folder: Path, split: str) -> Path:
        return folder / "SVAMP.json"

    def _read_rows(self, path: Path) -> list[dict]:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of problems, got {type(rows).__name__}")
        return rows

    def _hub_split(self, split: str) -> str:
        return "train+test"

    def _from_row(self, row: dict, where: str) -> TaskExample:
        _require(row, ("Body", "Question", "Answer"), where)
        text = f"{row['Body'].strip()} {row['Question'].strip()}".strip()  # as the SVAMP authors join them
        answer = _canonical(row["Answer"], where)
        solution = f"#### {answer}"
        if row.get("Equation"):
            solution = f"{_svamp_equation_to_text(row['Equation'])} = {answer}\n#### {answer}"
        meta = {"type": row.get("Type"), "equation": row.get("Equation")}
        return TaskExample(str(row.get("ID", "")), text, answer, solution=solution, meta=meta)


_OPERATORS = {"+", "-", "*", "/"}


def prefix_to_infix(tokens: Sequence[str]) -> str:
    """Prefix-notation tokens -> fully bracketed infix (outer brackets dropped): '* 56 9' -> '56 * 9'."""

    def parse(pos: int) -> tuple[str, int]:
        if pos >= len(tokens):
            raise ValueError(f"prefix equation {' '.join(tokens)!r} ends early")
        token = tokens[pos]
        if token not in _OPERATORS:
            return token, pos + 1
        left, pos = parse(pos + 1)
        right, pos = parse(pos)
        return f"({left} {token} {right})", pos

    text, end = parse(0)
    if end != len(tokens):
        raise ValueError(f"prefix equation {' '.join(tokens)!r} has extra tokens")
    return text[1:-1] if text.startswith("(") else text


_MASKED_NUMBER = re.compile(r"\bnumber(\d+)\b")


def unmask_numbers(text: str, numbers: Sequence[str], where: str) -> str:
    """Replace ``number0``, ``number1``, ... by their values (canonical form)."""

    def value(match: re.Match) -> str:
        index = int(match.group(1))
        if index >= len(numbers):
            raise ValueError(
                f"{where}: {match.group(0)} used but only {len(numbers)} numbers given: {numbers}"
            )
        return numbers[index]

    return _MASKED_NUMBER.sub(value, text)


class MaskedCSVMathTask(MathTask):
    """The SVAMP paper's CV folds of MAWPS / ASDiv-A (``<folder>/fold<k>/{train,dev}.csv``, masked numbers).

    No faithful Hub copy of these folds exists; get ``data/cv_<name>`` from GitHub arkilpatel/SVAMP.
    """

    hub_id = None
    splits = ("train", "dev", "test", *(f"fold{k}/{s}" for k in range(5) for s in ("train", "dev", "test")))
    train_split = "train"
    eval_split = "dev"
    source_hint: ClassVar[str]

    def __init__(self, fold: int = 0, keep_calculator_annotations: bool = True):
        super().__init__(keep_calculator_annotations)
        if fold not in range(5):
            raise ValueError(f"{self.name}: fold={fold} must be 0..4")
        self.fold = fold

    def _hub_hint(self) -> str:
        return (
            f"there is no Hub copy of these folds: download {self.source_hint} from GitHub arkilpatel/SVAMP"
        )

    def _fold_and_file(self, split: str) -> tuple[int, str]:
        fold, _, name = split.rpartition("/")
        name = "dev" if name == "test" else name
        return (int(fold[4:]) if fold else self.fold), name

    def _id_prefix(self, split: str) -> str:
        fold, name = self._fold_and_file(split)
        return f"fold{fold}/{name}"

    def _local_file(self, folder: Path, split: str) -> Path:
        fold, name = self._fold_and_file(split)
        return folder / f"fold{fold}" / f"{name}.csv"

    def _read_rows(self, path: Path) -> list[dict]:
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))

    def _from_row(self, row: dict, where: str) -> TaskExample:
        _require(row, ("Question", "Numbers", "Answer"), where)
        numbers = [_canonical(n, where) for n in row["Numbers"].split()]
        text = unmask_numbers(row["Question"].strip(), numbers, where)
        answer = _canonical(row["Answer"], where)
        solution = f"#### {answer}"
        if row.get("Equation"):
            infix = prefix_to_infix(unmask_numbers(row["Equation"], numbers, where).split())
            solution = f"{infix} = {answer}\n#### {answer}"
        meta = {"equation": row.get("Equation"), "type": row.get("Type")}
        return TaskExample("", text, answer, solution=solution, meta=meta)


class MAWPSTask(MaskedCSVMathTask):
    name = "mawps"
    folder = "mawps"
    source_hint = "data/cv_mawps"


class ASDivATask(MaskedCSVMathTask):
    name = "asdiv-a"
    folder = "asdiv-a"
    source_hint = "data/cv_asdiv-a"


class ArithmeticTask(MathTask):
    """The project's synthetic multi-step word problems, generated deterministically (no files needed)."""

    name = "arithmetic"
    folder = "arithmetic"
    hub_id = None
    splits = ("train", "validation", "test")
    train_split = "train"
    eval_split = "test"
    _SEED_OFFSET: ClassVar[dict[str, int]] = {"train": 0, "validation": 1, "test": 2}

    def __init__(
        self,
        n_train: int = 2000,
        n_eval: int = 200,
        n_steps: int | tuple[int, int] = (2, 4),
        max_operand: int = 20,
        seed: int = 0,
        keep_calculator_annotations: bool = True,
    ):
        super().__init__(keep_calculator_annotations)
        self.n_train, self.n_eval, self.n_steps = n_train, n_eval, n_steps
        self.max_operand, self.seed = max_operand, seed

    def load(
        self, split: str | None = None, data_dir: str | Path | None = None, limit: int | None = None
    ) -> list[TaskExample]:
        """Generate the split (``data_dir`` is ignored: nothing is read from disk)."""
        from modern_llm.data.synthetic import generate_dataset  # lazy: only this task needs it

        split = split or self.eval_split
        self._check_split(split)
        n = self.n_train if split == "train" else self.n_eval
        if limit is not None:
            _apply_limit([], limit)  # same validation as the file-backed tasks
            n = min(n, limit)
        seed = self.seed + self._SEED_OFFSET[split]
        rows = generate_dataset(n, n_steps=self.n_steps, max_operand=self.max_operand, seed=seed)
        return [
            TaskExample(
                f"{split}-{i}",
                r["question"],
                r["answer"],
                solution=r["solution"],
                meta={"n_steps": r["n_steps"]},
            )
            for i, r in enumerate(rows)
        ]


TASKS: dict[str, type[Task]] = {
    "sst2": SST2Task,
    "samsum": SAMSumTask,
    "gsm8k": GSM8KTask,
    "svamp": SVAMPTask,
    "mawps": MAWPSTask,
    "asdiv-a": ASDivATask,
    "arithmetic": ArithmeticTask,
}
_TASK_ALIASES = {"sst-2": "sst2", "asdiv": "asdiv-a", "asdiv_a": "asdiv-a", "synthetic": "arithmetic"}


def get_task(name: str, **kwargs: Any) -> Task:
    """A task object by name (``TASKS`` keys; case-insensitive; a few aliases); kwargs go to its constructor."""
    key = name.strip().lower()
    key = _TASK_ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key](**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """(B, T) tensor of ``rows`` padded with ``value`` to the longest row."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token first")
    return pad


def _require_keys(feature: dict, keys: Sequence[str], collator: str) -> None:
    missing = [k for k in keys if k not in feature]
    if missing:
        raise ValueError(
            f"{collator}: feature is missing {missing} (has {sorted(feature)}); build it with the task"
        )


@dataclass
class CausalLMCollator:
    """{"prompt", "completion"} features -> input_ids/attention_mask/labels with the prompt masked (-100)."""

    tokenizer: Any
    max_length: int = 1024
    add_eos: bool = True
    add_special_tokens: bool = True  # e.g. BOS for Llama-style tokenizers, in front of the prompt

    def encode(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids incl. EOS), truncated to ``max_length`` as described in the module."""
        tok = self.tokenizer
        p = tok(prompt, add_special_tokens=self.add_special_tokens)["input_ids"]
        if len(p) >= 2 and tok.bos_token_id is not None and p[0] == p[1] == tok.bos_token_id:
            p = p[1:]  # the chat template already wrote BOS
        c = tok(completion, add_special_tokens=False)["input_ids"]
        if self.add_eos and tok.eos_token_id is not None:
            c = c + [tok.eos_token_id]
        if len(c) >= self.max_length:
            c = c[: self.max_length - 1]
        budget = self.max_length - len(c)
        return p[-budget:], c

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids, labels = [], []
        for feature in features:
            _require_keys(feature, ("prompt", "completion"), "CausalLMCollator")
            p, c = self.encode(feature["prompt"], feature["completion"])
            ids.append(p + c)
            labels.append([-100] * len(p) + c)
        input_ids = _pad(ids, _pad_id(self.tokenizer))
        attention_mask = _pad([[1] * len(r) for r in ids], 0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": _pad(labels, -100)}


@dataclass
class Seq2SeqCollator:
    """{"source", "target"} features -> encoder input_ids/attention_mask and decoder labels (padding -100)."""

    tokenizer: Any
    max_source_length: int = 512
    max_target_length: int = 128

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        for feature in features:
            _require_keys(feature, ("source", "target"), "Seq2SeqCollator")
        tok = self.tokenizer
        src = [
            tok(f["source"], truncation=True, max_length=self.max_source_length)["input_ids"]
            for f in features
        ]
        tgt = [
            tok(f["target"], truncation=True, max_length=self.max_target_length)["input_ids"]
            for f in features
        ]
        return {
            "input_ids": _pad(src, _pad_id(tok)),
            "attention_mask": _pad([[1] * len(r) for r in src], 0),
            "labels": _pad(tgt, -100),
        }


@dataclass
class ClassificationCollator:
    """{"text", "label"} features -> input_ids/attention_mask and (B,) integer labels, for a classifier head."""

    tokenizer: Any
    max_length: int = 512

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        for feature in features:
            _require_keys(feature, ("text", "label"), "ClassificationCollator")
        rows = [
            self.tokenizer(f["text"], truncation=True, max_length=self.max_length)["input_ids"]
            for f in features
        ]
        return {
            "input_ids": _pad(rows, _pad_id(self.tokenizer)),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0),
            "labels": torch.tensor([int(f["label"]) for f in features], dtype=torch.long),
        }


def verbalizer_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """First token id of each label word; ValueError if two words share it (they could not be told apart)."""
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"verbalizer words {list(words)} share a first token; choose words that differ at once"
        )
    return ids


@dataclass
class VerbalizerCollator:
    """{"prompt", "label"} features -> prompt ids (right-padded), ``last_index`` (B,), labels (B,), choice_ids (C,).

    ``words[i]`` is the label word for class ``i``, written as it follows the prompt (plain format: with a
    leading space, e.g. " positive"; chat format: bare, e.g. "positive").
    """

    tokenizer: Any
    words: Sequence[str]
    max_length: int = 1024
    add_special_tokens: bool = True

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = []
        for feature in features:
            _require_keys(feature, ("prompt", "label"), "VerbalizerCollator")
            ids = self.tokenizer(feature["prompt"], add_special_tokens=self.add_special_tokens)["input_ids"]
            rows.append(ids[-self.max_length :])  # keep the end: the cue and the query live there
        return {
            "input_ids": _pad(rows, _pad_id(self.tokenizer)),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0),
            "last_index": torch.tensor([len(r) - 1 for r in rows], dtype=torch.long),
            "labels": torch.tensor([int(f["label"]) for f in features], dtype=torch.long),
            "choice_ids": torch.tensor(verbalizer_token_ids(self.tokenizer, self.words), dtype=torch.long),
        }


def verbalizer_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, C) next-token logits of the label words at each prompt's last real token.

    Train with ``cross_entropy(verbalizer_logits(model, batch), batch["labels"])``; predict with ``argmax``.
    Right padding + gathering at ``last_index`` keeps position ids correct for absolute-position models.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[rows, batch["last_index"].to(logits.device)]  # (B, V)
    return last[:, batch["choice_ids"].to(logits.device)]  # (B, C)
