"""Tasks: loaders (fixtures + real data), prompts, answer extraction, grading, collators."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score
from sklearn.metrics import f1_score as sk_f1
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from modern_llm.data.task_datasets import (
    TASKS,
    CausalLMCollator,
    ClassificationCollator,
    Seq2SeqCollator,
    TaskExample,
    VerbalizerCollator,
    extract_number_answer,
    get_task,
    pick_shots,
    prefix_to_infix,
    verbalizer_logits,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tasks"
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def gpt2_tok():
    from modern_llm.data.tokenizer import gpt2_tokenizer_dir

    tok = PreTrainedTokenizerFast.from_pretrained(gpt2_tokenizer_dir())
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def tiny_gpt2(gpt2_tok):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(gpt2_tok), n_embd=16, n_layer=1, n_head=2, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


# ------------------------------------------------------------------------------------------- answer extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,234.50", "1234.5"),
        ("#### 72", "72"),
        ("She pays 5 + 7 = 12 dollars.\n#### 1,245", "1245"),
        ("The answer is 3.", "3"),
        ("The answer is $1,234.50. Then 7 more things", "1234.5"),
        ("Answer: -4 degrees", "-4"),
        ("so \\boxed{42} is it, not 7", "42"),
        ("She had 5 apples and 7 pears, so 12", "12"),
        ("It costs 2.50 dollars", "2.5"),
        ("no number here", None),
        ("", None),
        (None, None),
        ("#### ???\nso the total is 9", "9"),  # an empty '####' falls through to the next rule
    ],
)
def test_extract_number_answer(text, expected):
    assert extract_number_answer(text) == expected


def test_math_extraction_cuts_at_the_next_question():
    task = get_task("gsm8k")
    generation = "3 + 4 = 7 apples.\nQuestion: Tom has 99 pens and 1 cap. How many?\nAnswer: 100"
    assert task.extract_answer(generation) == "7"
    assert task.extract_answer("7") == "7"  # idempotent on its own output


def test_sst2_extraction():
    task = get_task("sst2")
    assert task.extract_answer(" Positive.") == 1
    assert task.extract_answer("negative, not positive") == 0  # first label word wins
    assert task.extract_answer("meh") is None
    assert task.extract_answer(1) == 1 and task.extract_answer(5) is None
    assert task.extract_answer("positively") is None  # whole words only


def test_prefix_to_infix():
    assert prefix_to_infix(["*", "56", "9"]) == "56 * 9"
    assert prefix_to_infix(["+", "-", "20", "7", "4"]) == "(20 - 7) + 4"
    assert prefix_to_infix(["5"]) == "5"
    with pytest.raises(ValueError, match="ends early"):
        prefix_to_infix(["+", "1"])
    with pytest.raises(ValueError, match="extra tokens"):
        prefix_to_infix(["1", "2"])


# ------------------------------------------------------------------------------------------- loaders (fixtures)


def test_fixture_loaders_parse_every_task():
    sst = get_task("sst2").load("validation", data_dir=FIXTURES)
    assert [e.label for e in sst] == [1, 0, 0] and sst[0].answer == "positive"
    assert sst[2].text == 'an "instant" classic , if you like naps'  # quotes kept literally in TSV

    sam = get_task("samsum").load("test", data_dir=FIXTURES)
    assert sam[0].id == "fx-1" and "\r" not in sam[0].text

    gsm = get_task("gsm8k").load("test", data_dir=FIXTURES)
    assert [e.answer for e in gsm] == ["36", "1245"]
    assert gsm[0].id == "test-0" and gsm[0].solution.endswith("#### 36")

    sv = get_task("svamp").load("test", data_dir=FIXTURES)
    assert (
        sv[0].text == "A shelf holds 14 books. Lena takes away 6 books How many books are left on the shelf?"
    )
    assert sv[0].answer == "8" and sv[0].solution == "14 - 6 = 8\n#### 8"
    assert sv[1].solution.startswith("2.5 * 4 = 10")

    maw = get_task("mawps").load("dev", data_dir=FIXTURES)
    assert maw[0].text.startswith("Kim has 20 marbles and gives 7 to her brother . She then finds 4 more")
    assert maw[0].solution == "(20 - 7) + 4 = 17\n#### 17" and maw[1].answer == "6"
    assert get_task("mawps").load("test", data_dir=FIXTURES) == maw  # test = dev, as in the SVAMP paper
    assert get_task("mawps").load("fold0/train", data_dir=FIXTURES)[0].answer == "30"

    asd = get_task("asdiv-a").load("dev", data_dir=FIXTURES)
    assert (
        asd[0].text == "there are 3 cats and 4 dogs in 2 houses . how many pets are there ?"
    )  # number10 != number1


def test_task_folder_itself_and_env_var_and_limit(monkeypatch):
    assert len(get_task("gsm8k").load("test", data_dir=FIXTURES / "gsm8k")) == 2
    monkeypatch.setenv("MODERN_LLM_DATA_DIR", str(FIXTURES))
    assert len(get_task("sst2").load("train", limit=2)) == 2
    assert len(get_task("sst2").load()) == 3  # default split = eval split (validation)
    with pytest.raises(ValueError, match="limit"):
        get_task("sst2").load(limit=-1)


def test_missing_folder_error_names_folder_and_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        get_task("gsm8k").load("test", data_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "gsm8k") in msg and "openai/gsm8k" in msg
    with pytest.raises(FileNotFoundError, match="arkilpatel/SVAMP"):
        get_task("mawps").load("dev", data_dir=tmp_path)
    # A folder that has the task but not this split says which splits are there.
    with pytest.raises(FileNotFoundError, match=r"present: \['test'\].*knkarthick/samsum"):
        get_task("samsum").load("train", data_dir=FIXTURES)


def test_hub_fallback_offline_error(monkeypatch):
    monkeypatch.delenv("MODERN_LLM_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="nyu-mll/glue"):
        get_task("sst2").load("validation")


def test_bad_rows_name_file_and_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(ValueError, match=r"test.jsonl:1: GSM8K answer has no '#### <number>'"):
        get_task("gsm8k").load("test", data_dir=tmp_path)
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"test.jsonl:1: missing field\(s\) \['answer'\]"):
        get_task("gsm8k").load("test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        get_task("gsm8k").load("validation", data_dir=tmp_path)


def test_get_task_and_shots():
    assert set(TASKS) == {"sst2", "samsum", "gsm8k", "svamp", "mawps", "asdiv-a", "arithmetic"}
    assert get_task("SST-2").name == "sst2" and get_task("asdiv").name == "asdiv-a"
    with pytest.raises(ValueError, match="known tasks"):
        get_task("mnli")
    pool = get_task("sst2").load("train", data_dir=FIXTURES)
    shots = pick_shots(pool, 3, seed=1, exclude=pool[0])
    assert len(shots) == 3 and pool[0] not in shots
    assert shots == pick_shots(pool, 3, seed=1, exclude=pool[0])  # deterministic
    with pytest.raises(ValueError, match="only 3 usable"):
        pick_shots(pool, 4, exclude=pool[0])


def test_arithmetic_task_is_deterministic_and_graded():
    task = get_task("arithmetic", n_eval=5, n_steps=2, max_operand=9)
    a, b = task.load("test"), task.load("test")
    assert a == b and len(a) == 5 and a != task.load("validation")
    assert len(task.load("test", limit=2)) == 2
    assert task.score([task.target_text(e) for e in a], a)["accuracy"] == 1.0
    assert task.is_correct(f"so #### {a[0].answer}", a[0])


# ------------------------------------------------------------------------------------------- prompts


def test_plain_prompt_zero_and_k_shot():
    task = get_task("gsm8k")
    test, train = task.load("test", data_dir=FIXTURES), task.load("train", data_dir=FIXTURES)
    zero = task.render_prompt(test[0])
    assert zero.startswith(task.instruction) and zero.endswith(f"Question: {test[0].text}\nAnswer:")
    one = task.render_prompt(test[0], shots=train)
    assert f"Question: {train[0].text}\nAnswer: {train[0].solution}\n\nQuestion: {test[0].text}" in one
    pair = task.sft_pair(test[0])
    assert pair == {"prompt": zero, "completion": " " + test[0].solution}
    stripped = get_task("gsm8k", keep_calculator_annotations=False).target_text(test[0])
    assert "<<" not in stripped and stripped.endswith("#### 36")


def test_chat_prompt_uses_template_and_turns(gpt2_tok):
    task = get_task("sst2")
    train = task.load("train", data_dir=FIXTURES)
    example = task.load("validation", data_dir=FIXTURES)[0]
    tok = PreTrainedTokenizerFast(tokenizer_object=gpt2_tok.backend_tokenizer)
    tok.chat_template = SIMPLE_CHAT_TEMPLATE
    text = task.render_prompt(example, shots=train[:2], chat=True, tokenizer=tok)
    assert (
        text.count("<|user|>") == 3 and text.count("<|assistant|>") == 3
    )  # 2 answered shots + generation cue
    assert f"<|assistant|>{train[0].answer}<|end|>" in text
    assert text.startswith(f"<|user|>{task.instruction}") and text.endswith("<|assistant|>")
    assert task.sft_pair(example, chat=True, tokenizer=tok)["completion"] == "positive"
    with pytest.raises(ValueError, match="chat template"):
        task.render_prompt(example, chat=True, tokenizer=gpt2_tok)


def test_seq2seq_sources_use_t5_prefixes():
    sam = get_task("samsum")
    ex = sam.load("test", data_dir=FIXTURES)[0]
    assert sam.seq2seq_records([ex]) == [{"source": f"summarize: {ex.text}", "target": ex.answer}]
    sst = get_task("sst2")
    assert sst.seq2seq_source(sst.load("validation", data_dir=FIXTURES)[0]).startswith("sst2 sentence: ")


# ------------------------------------------------------------------------------------------- grading


def test_sst2_score_matches_sklearn():
    task = get_task("sst2")
    examples = [TaskExample(str(i), "x", "", label=y) for i, y in enumerate([1, 0, 1, 1, 0, 0])]
    preds = ["positive", "positive", "Negative", "positive!", "negative", "no idea"]
    as_ints = [1, 1, 0, 1, 0, -1]
    gold = [1, 0, 1, 1, 0, 0]
    scores = task.score(preds, examples)
    assert scores["accuracy"] == pytest.approx(accuracy_score(gold, as_ints))
    # For positive-class F1 an invalid answer is just "not positive": sklearn sees it as 0.
    assert scores["f1"] == pytest.approx(sk_f1(gold, [max(p, 0) for p in as_ints], pos_label=1))
    assert scores["invalid_rate"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="2 predictions for 6"):
        task.score(preds[:2], examples)


def test_samsum_score_matches_rouge_score():
    task = get_task("samsum")
    examples = task.load("test", data_dir=FIXTURES)
    preds = ["Rita and Omar meet for lunch tomorrow.\n\nDialogue: ignored", "Tom lost keys."]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [
        scorer.score(e.answer, p)["rougeL"].fmeasure
        for e, p in zip(examples, ["Rita and Omar meet for lunch tomorrow.", "Tom lost keys."])
    ]
    assert task.score(preds, examples)["rougeL"] == pytest.approx(sum(expected) / 2)
    assert task.reward(examples[0].answer, examples[0]) == pytest.approx(1.0)
    assert task.is_correct(examples[0].answer, examples[0]) and not task.is_correct("xyz", examples[0])


def test_math_score():
    task = get_task("gsm8k")
    examples = task.load("test", data_dir=FIXTURES)  # answers 36 and 1245
    scores = task.score(["... so 36 rolls", "I am not sure"], examples)
    assert scores == {"accuracy": 0.5, "no_answer_rate": 0.5, "n": 2.0}
    assert task.is_correct("The answer is $1,245.00.", examples[1])
    assert task.reward("#### 35", examples[0]) == 0.0


# ------------------------------------------------------------------------------------------- collators


def test_causal_collator_masks_prompt_and_padding(gpt2_tok, tiny_gpt2):
    collate = CausalLMCollator(gpt2_tok, max_length=64)
    feats = [
        {"prompt": "Review: great\nSentiment:", "completion": " positive"},
        {"prompt": "Hi", "completion": " a b c"},
    ]
    batch = collate(feats)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    p0 = gpt2_tok(feats[0]["prompt"])["input_ids"]
    c0 = gpt2_tok(feats[0]["completion"])["input_ids"] + [gpt2_tok.eos_token_id]
    assert ids[0, : len(p0) + len(c0)].tolist() == p0 + c0
    assert labels[0].tolist() == [-100] * len(p0) + c0 + [-100] * (ids.shape[1] - len(p0) - len(c0))
    assert (labels[mask == 0] == -100).all()

    # The HF loss equals a hand-computed CE over completion tokens only ...
    logits = tiny_gpt2(input_ids=ids, attention_mask=mask).logits.detach().requires_grad_(True)
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    keep = shift_labels != -100
    manual = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep])
    hf_loss = tiny_gpt2(**batch).loss
    torch.testing.assert_close(hf_loss, manual)
    # ... and masked positions get exactly zero gradient: they contribute nothing.
    manual.backward()
    grad_rows = logits.grad[:, :-1].abs().sum(-1)  # (B, T-1)
    assert (grad_rows[~keep] == 0).all() and (grad_rows[keep] > 0).all()


def test_causal_collator_truncates_prompt_from_the_left(gpt2_tok):
    collate = CausalLMCollator(gpt2_tok, max_length=8)
    batch = collate([{"prompt": "one two three four five six seven eight", "completion": " nine ten"}])
    assert batch["input_ids"].shape == (1, 8)
    assert gpt2_tok.decode(batch["input_ids"][0]).endswith(" eight nine ten<|endoftext|>")
    assert (batch["labels"][0] != -100).sum() == 3
    with pytest.raises(ValueError, match="missing"):
        collate([{"text": "x"}])


def test_causal_collator_drops_doubled_bos(gpt2_tok):
    tok = PreTrainedTokenizerFast(tokenizer_object=gpt2_tok.backend_tokenizer, bos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token = "<|endoftext|>"
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.bos_token_id)]
    )
    p, _ = CausalLMCollator(tok).encode("<|endoftext|>Hi", " there")
    assert p[:2] == [tok.bos_token_id, tok("Hi", add_special_tokens=False)["input_ids"][0]]


def test_seq2seq_and_classification_collators(gpt2_tok):
    feats = [
        {"source": "summarize: a long dialogue here", "target": "short"},
        {"source": "hi", "target": "a b c d"},
    ]
    batch = Seq2SeqCollator(gpt2_tok)(feats)
    assert batch["labels"][0].tolist()[1:] == [-100] * (batch["labels"].shape[1] - 1)
    assert batch["attention_mask"][1].sum() == len(gpt2_tok("hi")["input_ids"])
    cls = ClassificationCollator(gpt2_tok)([{"text": "good", "label": 1}, {"text": "bad movie", "label": 0}])
    assert cls["labels"].tolist() == [1, 0] and cls["input_ids"].shape[0] == 2


def test_verbalizer_collator_and_logits(gpt2_tok, tiny_gpt2):
    task = get_task("sst2")
    examples = task.load("validation", data_dir=FIXTURES)
    feats = [{"prompt": task.render_prompt(e), "label": e.label} for e in examples]
    collate = VerbalizerCollator(gpt2_tok, words=[" negative", " positive"])
    batch = collate(feats)
    assert batch["choice_ids"].tolist() == [4633, 3967]  # GPT-2 ids of " negative", " positive"
    with torch.no_grad():
        scores = verbalizer_logits(tiny_gpt2, batch)  # (B, 2)
        for i, f in enumerate(feats):  # reference: unpadded forward, last position
            ids = torch.tensor([gpt2_tok(f["prompt"])["input_ids"]])
            torch.testing.assert_close(scores[i], tiny_gpt2(ids).logits[0, -1, batch["choice_ids"]])
    with pytest.raises(ValueError, match="share a first token"):
        VerbalizerCollator(gpt2_tok, words=[" good", " goodish"])(feats)  # both start with " good"


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.data
def test_real_data_counts_and_first_records(shared_data):
    counts = {
        ("sst2", "validation"): 872,
        ("gsm8k", "test"): 1319,
        ("svamp", "test"): 1000,
        ("samsum", "test"): 819,
        ("asdiv-a", "dev"): 238,
    }
    for (name, split), n in counts.items():
        examples = get_task(name).load(split, data_dir=shared_data)
        assert len(examples) == n, name
    gsm = get_task("gsm8k").load("test", data_dir=shared_data, limit=1)[0]
    assert gsm.text.startswith("Janet’s ducks lay 16 eggs per day") and gsm.answer == "18"
    sv = get_task("svamp").load("test", data_dir=shared_data, limit=1)[0]
    assert sv.answer == "51" and sv.solution.startswith("76 - 25 = 51")
    sam = get_task("samsum").load("test", data_dir=shared_data, limit=1)[0]
    assert sam.id == "13862856" and sam.text.startswith("Hannah: Hey, do you have Betty's number?")
    sst = get_task("sst2").load("validation", data_dir=shared_data)
    assert sum(e.label for e in sst) == 444  # SOURCE.md: 444 positive
    maw = get_task("mawps").load("dev", data_dir=shared_data, limit=1)[0]
    assert "number0" not in maw.text and "56 books" in maw.text and maw.answer == "504"


@pytest.mark.data
def test_real_data_targets_grade_as_correct_and_equations_hold(shared_data):
    from modern_llm.inference.tools import safe_eval_exact

    for name, split in [("gsm8k", "test"), ("svamp", "test"), ("mawps", "dev"), ("asdiv-a", "dev")]:
        task = get_task(name)
        examples = task.load(split, data_dir=shared_data)
        assert task.score([task.target_text(e) for e in examples], examples)["accuracy"] == 1.0, name
        if name == "gsm8k":
            continue
        wrong = 0
        for e in examples:  # the one-line solution's equation evaluates to the gold answer
            value = safe_eval_exact(e.solution.split(" = ")[0])
            wrong += abs(float(value) - float(e.answer)) > 1e-6 * max(1.0, abs(float(value)))
        assert wrong <= 0.01 * len(examples), f"{name}: {wrong} equations disagree with their answers"


def test_fixture_files_are_valid_json():
    for path in FIXTURES.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)


def test_math_steps_valid_flags_wrong_arithmetic():
    task = get_task("gsm8k")
    assert task.steps_valid("Emma has 8 - 9 = 1 toy car left.\n#### 1") is False
    assert task.steps_valid("Grace has 10 - 9 = 1 bead left.\n#### 1") is True
    assert task.steps_valid("She pays 48/2 = <<48/2=24>>24 dollars. Then 24 * 2 = 48\n#### 48") is True
    assert task.steps_valid("She pays <<48/2=25>>25 dollars.\n#### 25") is False
    assert task.steps_valid("#### 3") is None  # nothing to check
    # steps after a stop sequence belong to the next question, not to this solution
    assert task.steps_valid("2 + 2 = 4\n#### 4\nQuestion: 1 + 1 = 3") is True
