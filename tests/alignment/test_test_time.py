"""Test-time compute: voting / pass@k on fixed examples, accuracy-vs-N bookkeeping, the calculator tool and
revise-and-retry through the real engine on a tiny model, and one end-to-end experiment run."""

import itertools
import json
from math import comb

import pytest
import torch

from modern_llm.alignment import test_time as tt
from modern_llm.config import ModernLLMConfig
from modern_llm.data.synthetic import generate_dataset
from modern_llm.data.task_datasets import TaskExample, get_task
from modern_llm.data.tokenizer import train_bpe_tokenizer
from modern_llm.evaluation import report_tables as rt
from modern_llm.inference.sampling import SamplingParams
from modern_llm.inference.tools import calculator_completion
from modern_llm.models import ModernDecoderLM

ROWS = generate_dataset(40, n_steps=(1, 2), max_operand=10, seed=0)
CORPUS = [f"Question: {r['question']}\nAnswer: {r['solution']}" for r in ROWS] * 2


def att(answer, correct, tokens=10, score=None, text=None):
    return tt.Attempt(
        text=text if text is not None else f"#### {answer}",
        answer=answer,
        correct=correct,
        num_tokens=tokens,
        score=score,
    )


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModernLLMConfig(
        vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, max_seq_len=512, init_std=0.3
    )
    return ModernDecoderLM(cfg).eval()


@pytest.fixture(scope="module")
def task():
    return get_task("arithmetic", n_steps=(1, 2), max_operand=10)


def question_prompts(task, n):
    examples = task.load("test", limit=n)
    return examples, [task.render_prompt(ex) for ex in examples]


# ----------------------------------------------------------------------------------------------- voting


def test_majority_weighted_best_of_n_and_pass_at_k_on_fixed_examples():
    attempts = [
        att("3", True, score=0.1),
        att("5", False, score=0.9),
        att("3", True, score=0.1),
        att(None, False, score=0.5),
        att("5", False, score=0.3),
    ]
    assert tt.select_majority(attempts) is attempts[0]  # 2-2 tie between "3" and "5": earliest answer wins
    assert tt.select_majority(attempts[1:]) is attempts[1]  # "5" x2 beats "3" x1
    assert tt.select_majority([att(None, False)]) is None
    assert tt.select_weighted_vote(attempts) is attempts[1]  # "5": 1.2 vs "3": 0.2; None never wins
    assert tt.select_best_of_n(attempts) is attempts[1]
    tied = [att("1", False, score=0.7), att("2", True, score=0.7)]
    assert tt.select_best_of_n(tied) is tied[0]  # first on ties
    with pytest.raises(ValueError, match="scored"):
        tt.select_best_of_n([att("1", True)])
    # Unbiased pass@k vs brute force over all k-subsets: c = 2 of n = 5.
    correct = [a.correct for a in attempts]
    for k in range(1, 6):
        subsets = list(itertools.combinations(correct, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert tt.oracle_pass_at_n(attempts, k) == pytest.approx(brute)
    assert tt.oracle_pass_at_n(attempts, 2) == pytest.approx(1 - comb(3, 2) / comb(5, 2))


def test_parse_final_answer_strict_formats_and_format_report():
    assert tt.parse_final_answer("2 + 3 = 5\n#### 5") == "5"
    assert tt.parse_final_answer("so the answer is $1,200.50.") == "1200.5"
    assert tt.parse_final_answer("The final answer is: -4") == "-4"
    assert tt.parse_final_answer("#### 7 ... wait. The answer is 8") == "8"  # the last marker wins
    assert tt.parse_final_answer("she has 12 apples") is None  # no fallback to the last number
    assert tt.parse_final_answer("#### twelve") is None
    assert tt.parse_final_answer(None) is None
    rows = [att("5", True, text="#### 5"), att("5", True, text="she has 5"), att("4", False, text="#### 4")]
    for a in rows:
        a.structured_answer = tt.parse_final_answer(a.text)
    rep = tt.format_report(rows)
    assert rep["format_violation_rate"] == pytest.approx(1 / 3)
    assert rep["strict_accuracy"] == pytest.approx(1 / 3) and rep["lenient_accuracy"] == pytest.approx(2 / 3)
    assert rep["strict_equals_lenient"] == 1.0


# ----------------------------------------------------------------------------------------------- accuracy vs N


def hand_runs(with_scores: bool):
    ex = TaskExample("q", "question", "1")
    s = (lambda v: v) if with_scores else (lambda v: None)
    q1 = [att("1", True, score=s(0.2)), att("1", True, score=s(0.9)), att("7", False, score=s(0.95))]
    q1.append(att("7", False, score=s(0.1)))
    q2 = [att("2", False, tokens=10, score=s(0.5)) for _ in range(4)]
    return [
        tt.QuestionRun(ex, "p1", att("1", True, tokens=6, score=s(0.5)), q1),
        tt.QuestionRun(ex, "p2", att("9", False, tokens=8, score=s(0.5)), q2),
    ]


def test_subsets_are_nested_seeded_and_full_at_n_max():
    for q, d in [(0, 0), (3, 5)]:
        prev: set[int] = set()
        for n in range(1, 9):
            idx = tt.subsample_indices(8, n, seed=1, question=q, draw=d)
            assert idx == sorted(idx) and len(set(idx)) == n and prev <= set(idx)
            prev = set(idx)
        assert tt.subsample_indices(8, 8, 1, q, d) == list(range(8))
    assert tt.subsample_indices(8, 3, 1, 0, 0) == tt.subsample_indices(8, 3, 1, 0, 0)
    with pytest.raises(ValueError, match="n_max"):
        tt.subsample_indices(4, 5, 0, 0, 0)


def test_accuracy_vs_n_bookkeeping_on_hand_made_samples():
    runs = hand_runs(with_scores=True)
    res = tt.accuracy_vs_n(runs, [4, 1, 2], n_draws=6, seed=3)
    assert res["N"] == [1, 2, 4] and res["n_max"] == 4 and res["n_questions"] == 2
    assert res["greedy"] == {"accuracy": 0.5, "tokens_per_question": 7.0}
    assert res["tokens_per_question"] == [10.0, 20.0, 40.0]  # every sample has 10 tokens
    assert res["sampled_pass_at_1"] == pytest.approx(0.25)
    # Oracle pass@N, unbiased: q1 has c=2 of 4, q2 has none.
    assert res["curves"]["oracle_pass_at_n"]["accuracy"] == pytest.approx([0.25, (1 - 1 / 6) / 2, 0.5])
    # N = 4 is the full set: majority ties 1 vs 7 -> earliest ("1", right); best-of-4 picks 0.95 ("7", wrong);
    # weighted: "1" 1.1 vs "7" 1.05 -> right. q2 is always wrong.
    assert res["curves"]["majority"]["accuracy"][2] == 0.5
    assert res["curves"]["verifier_best_of_n"]["accuracy"][2] == 0.0
    assert res["curves"]["verifier_weighted_vote"]["accuracy"][2] == 0.5
    # N = 1, recomputed by hand from the same seeded subsets: right iff the one sample is index 0 or 1.
    hits = [tt.subsample_indices(4, 1, 3, 0, d)[0] in (0, 1) for d in range(6)]
    for method in ("majority", "verifier_best_of_n", "verifier_weighted_vote"):
        assert res["curves"][method]["accuracy"][0] == pytest.approx(sum(hits) / 6 / 2)
    assert res["curves"]["majority"]["draw_std"][2] == 0.0  # one draw at N = n_max
    unscored = tt.accuracy_vs_n(hand_runs(with_scores=False), [1, 4], n_draws=2)
    assert set(unscored["curves"]) == {"majority", "oracle_pass_at_n"}  # no verifier curves without scores
    with pytest.raises(ValueError, match="n_max"):
        tt.accuracy_vs_n(runs, [8])
    runs[1].samples.pop()
    with pytest.raises(ValueError, match="same number"):
        tt.accuracy_vs_n(runs, [1])


def test_scorer_quality_uses_stored_scores_or_the_score_function():
    q = tt.scorer_quality(hand_runs(with_scores=True), lambda q, s: 1 / 0)  # stored scores: fn never called
    # right: 0.2, 0.9; wrong: 0.95, 0.1, 0.5 x4 -> 6 of the 12 (right, wrong) pairs ordered correctly.
    assert q["auc"] == pytest.approx(0.5) and q["mean_score_right"] == pytest.approx(0.55)
    assert q["positive_rate"] == pytest.approx(2 / 8)
    # Only q1 has both classes: right 0.2, 0.9 vs wrong 0.95, 0.1 -> 2 of 4 pairs ordered correctly.
    assert q["within_question_auc"] == pytest.approx(0.5) and q["mixed_questions"] == 1
    perfect = tt.scorer_quality(hand_runs(with_scores=False), lambda q, s: float(s == "#### 1"))
    assert perfect["auc"] == 1.0 and perfect["mean_score_wrong"] == 0.0


def test_agreement_scorer_and_score_pairs():
    runs = hand_runs(with_scores=False)
    task = get_task("arithmetic")
    score = tt.agreement_scorer(runs, task)
    assert score("p1", "so #### 7") == 0.5 and score("p2", "#### 2") == 1.0 and score("p2", "no idea") == 0.0
    with pytest.raises(ValueError, match="unknown question"):
        score("p3", "#### 1")

    class Batched:
        calls = 0

        def score_batch(self, qs, ss):
            Batched.calls += 1
            return [len(s) / 10 for s in ss]

        def __call__(self, q, s):  # pragma: no cover - score_batch must be preferred
            raise AssertionError("per-pair path used although score_batch exists")

    assert tt.score_pairs(Batched(), ["a", "b"], ["xy", "xyz"]) == [0.2, 0.3] and Batched.calls == 1
    with pytest.raises(ValueError, match="finite"):
        tt.score_pairs(lambda q, s: float("nan"), ["a"], ["b"])


# ----------------------------------------------------------------------------------------------- engine


def test_calculator_tool_is_force_inserted_through_the_engine(model, tok, task):
    examples, prompts = question_prompts(task, 2)

    def opener_then_calculator(text):  # stands in for a model that writes "<<2+3=" itself
        return calculator_completion(text) or (None if "<<" in text else "<<2+3=")

    sampling = SamplingParams(temperature=1.0, seed=5, max_new_tokens=16)
    runs = tt.collect_runs(
        model,
        tok,
        task,
        examples,
        prompts,
        3,
        sampling,
        stop_ids=[tok.eos_token_id],
        tools=opener_then_calculator,
    )
    assert len(runs) == 2 and all(len(r.samples) == 3 for r in runs)
    attempts = [a for r in runs for a in (r.greedy, *r.samples)]
    for a in attempts:
        assert "<<2+3=5>>" in a.text and a.num_tool_tokens > 0 and a.num_tokens <= 16
    calc = tt.calculation_report(attempts)
    assert calc["attempts_with_tool_insertion"] == 1.0 and calc["wrong_annotation_rate"] == 0.0
    off = tt.collect_runs(model, tok, task, examples, prompts, 3, sampling, stop_ids=[tok.eos_token_id])
    assert all(a.num_tool_tokens == 0 for r in off for a in r.samples)
    # Same seed -> sample s is the same sequence with and without scoring, and grading is the task's.
    again = tt.collect_runs(model, tok, task, examples, prompts, 3, sampling, stop_ids=[tok.eos_token_id])
    assert [a.text for a in again[0].samples] == [a.text for a in off[0].samples]
    for run in off:
        for a in run.samples:
            assert a.correct == task.is_correct(a.text, run.example)


def test_revise_triggers_only_below_threshold_and_counts_fixes_and_breaks(model, tok, task):
    examples, prompts = question_prompts(task, 3)
    runs = [tt.QuestionRun(ex, p, att("1", True), []) for ex, p in zip(examples, prompts)]
    initial = [
        att("999999", True, text="INITIAL right"),  # claims right: a revision that replaces it "breaks" it
        att("999999", False, text="INITIAL wrong"),
        att("999999", True, text="INITIAL confident"),
    ]
    calls = []

    def score(question, solution):  # deterministic: only the first two initial attempts are unsure
        calls.append(solution)
        if solution.startswith("INITIAL"):
            return 0.9 if "confident" in solution else 0.1
        return 0.8  # any revision scores higher -> accepted

    cfg = tt.ReviseConfig(threshold=0.5, rounds=3, num_samples=2, temperature=1.0)
    sampling = SamplingParams(temperature=1.0, seed=0, max_new_tokens=8)
    out = tt.revise_and_retry(
        model, tok, task, runs, initial, score, cfg, sampling, chat=False, stop_ids=[tok.eos_token_id]
    )
    assert [r["triggered"] for r in out["rounds"]] == [2]  # round 2: the revisions score 0.8 >= 0.5
    assert out["rounds"][0]["accepted"] == 2 and out["rounds"][0]["triggered_were_correct"] == 1
    assert out["final"][2].text == "INITIAL confident" and out["final"][2].score == 0.9  # untouched
    assert not out["final"][0].text.startswith("INITIAL") and out["final"][0].score == 0.8
    s = out["summary"]
    assert s["trigger_rate"] == pytest.approx(2 / 3)
    assert (s["triggered_initially_correct"], s["triggered_initially_wrong"]) == (1, 1)
    assert s["broken"] == 1 and s["fixed"] == 0  # a random tiny model does not find 999999
    assert s["accuracy_before"] == pytest.approx(2 / 3) and s["accuracy_after"] == pytest.approx(1 / 3)
    assert 0 < s["extra_tokens_per_question"] <= 2 * 2 * 8 / 3
    assert len(calls) == 3 + 2 * 2  # initial scores + one score per candidate
    # Revisions that never beat the current score keep the attempt and re-trigger every round.
    stuck = tt.revise_and_retry(
        model,
        tok,
        task,
        runs,
        initial,
        lambda q, s: 0.1,
        cfg,
        sampling,
        chat=False,
        stop_ids=[tok.eos_token_id],
    )
    assert [r["triggered"] for r in stuck["rounds"]] == [3, 3, 3] and stuck["summary"]["broken"] == 0
    assert [a.text for a in stuck["final"]] == [a.text for a in initial]
    # Threshold 0: nothing is ever below it -> no round, no generation.
    none = tt.revise_and_retry(
        model,
        tok,
        task,
        runs,
        initial,
        lambda q, s: 0.0,
        tt.ReviseConfig(threshold=0.0),
        sampling,
        chat=False,
    )
    assert none["rounds"] == [] and none["summary"]["extra_tokens_per_question"] == 0
    with pytest.raises(ValueError, match="num_samples 1"):
        tt.ReviseConfig(temperature=0.0, num_samples=2)


def test_revision_prompt_plain_and_chat(tok, task):
    ex, shot = task.load("test", limit=2)
    prompt = task.render_prompt(ex)
    plain = tt.revision_prompt(task, ex, prompt, " 1 + 1 = 3\n#### 3", "Fix it.", chat=False)
    assert plain == f"{prompt} 1 + 1 = 3\n#### 3\n\nFix it.\nAnswer:"
    chat = tt.revision_prompt(task, ex, prompt, "#### 3", "Fix it.", chat=True, tokenizer=tok, shots=[shot])
    assert chat.index(shot.text) < chat.index(ex.text) < chat.index("#### 3") < chat.index("Fix it.")


# ----------------------------------------------------------------------------------------------- end to end


def test_run_experiment_end_to_end_writes_record_and_plot(model, tok, tmp_path):
    from modern_llm.models.verifier import save_verifier, verifier_from_lm
    from modern_llm.training.train_sft import save_policy

    policy = save_policy(model, tok, tmp_path / "policy")
    verifier = save_verifier(verifier_from_lm(model), tmp_path / "verifier", tok)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "data:\n  task: arithmetic\n  task_args: {n_steps: [1, 2], max_operand: 10}\n  chat: false\n"
    )
    argv = [
        "--config", str(config), "--name", "tiny", "--model", str(policy), "--verifier", str(verifier),
        "--n_questions", "2", "--n_max", "4", "--ns", "[1, 2, 4]", "--n_draws", "2",
        "--sampling.max_new_tokens", "6", "--revise.rounds", "1", "--revise.num_samples", "2",
        "--revise.threshold", "0.9", "--revise_targets", "[greedy, best_of_n]",
        "--results_dir", str(tmp_path / "exp"), "--samples_dir", str(tmp_path / "samples"),
    ]  # fmt: skip
    assert tt.main(argv) == 0
    exp = tmp_path / "exp"
    assert (exp / "tiny-accuracy-vs-n.png").stat().st_size > 0
    grid = json.loads((exp / "tiny.json").read_text())
    assert set(grid["metrics"]["accuracy"]) == {"tool_off", "tool_on"}
    off = grid["metrics"]["accuracy"]["tool_off"]
    assert set(off) == {
        "greedy",
        "majority",
        "verifier_best_of_n",
        "verifier_weighted_vote",
        "oracle_pass_at_n",
    }
    assert list(off["majority"]) == ["N=1", "N=2", "N=4"]
    assert {"command", "git_commit", "protocol", "duration_s"} <= set(grid)
    revise = json.loads((exp / "tiny-revise.json").read_text())["metrics"]
    assert revise["revise"]["greedy"]["trigger_rate"] == 1.0  # zero-initialised head: every P(correct) = 0.5
    assert set(revise["revise"]) == {"greedy", "best_of_n"} and len(revise["rounds"]["greedy"]) == 1
    # Every record is table-shaped for the report: one table, no long form.
    records, skipped = rt.load_records(exp)
    assert not skipped and len(records) == 5  # grid, revise, format, tool, scorer
    for rec in records:
        tables = rt.tables_for_records([rec], "tt")
        assert tables and not any(t.long for t in tables), rec.path
    lines = (tmp_path / "samples" / "tiny" / "tool_on.jsonl").read_text().splitlines()
    assert len(lines) == 2 and len(json.loads(lines[0])["samples"]) == 4

    # rescoring the saved samples with the step checker reproduces the same curves for the score-free methods
    samples = str(tmp_path / "samples" / "tiny")
    rescore = argv + ["--name", "again", "--score", "steps", "--rescore_from", samples]
    assert tt.main(rescore) == 0
    again = json.loads((exp / "again.json").read_text())["metrics"]["accuracy"]
    for condition in ("tool_off", "tool_on"):
        for method in ("greedy", "majority", "oracle_pass_at_n"):
            assert again[condition][method] == grid["metrics"]["accuracy"][condition][method]
    # mean ± std over runs: two runs with the same greedy/majority curves give std 0 and the same means
    assert tt.main(argv + ["--name", "both", "--aggregate", "[tiny, again]"]) == 0
    both = json.loads((exp / "both.json").read_text())
    for method in ("greedy", "majority"):
        for n, value in grid["metrics"]["accuracy"]["tool_off"][method].items():
            assert both["metrics"]["accuracy"]["tool_off"][method][n] == pytest.approx([value, 0.0])
    assert both["protocol"]["aggregated_runs"] == ["tiny", "again"]
    scorer = json.loads((exp / "both-scorer.json").read_text())["metrics"]["scorer"]["tool_off"]
    assert len(scorer["positive_rate"]) == 2  # [mean, std]; a null (one-class AUC) stays null
    with pytest.raises(ValueError, match="rescore_from needs"):
        tt.run_experiment(
            tt.TestTimeConfig(score="verifier", rescore_from=str(tmp_path / "samples" / "tiny"))
        )


def test_main_help_and_config_validation(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tt.main(["--help"])
    assert exit_info.value.code == 0 and "revise" in capsys.readouterr().out
    with pytest.raises(ValueError, match="tools"):
        tt.TestTimeConfig(tools="maybe")
    with pytest.raises(ValueError, match="ns="):
        tt.TestTimeConfig(n_max=8, ns=[1, 16])


def test_every_test_time_config_file_loads():
    from pathlib import Path

    from modern_llm.config.base import load_config

    folder = Path(__file__).resolve().parents[2] / "configs" / "test_time"
    files = sorted(folder.glob("*.yaml"))
    assert files
    for path in files:
        cfg = load_config(tt.TestTimeConfig, path)
        assert cfg.name and cfg.n_questions >= 1, path


def test_instruction_override_reaches_the_prompt():
    from modern_llm.training.train_sft import TaskDataConfig, load_task

    data = TaskDataConfig(task="arithmetic", task_args={"n_train": 4, "n_eval": 2})
    example = load_task(data).load("test", limit=1)[0]
    default = load_task(data).render_prompt(example)
    short = load_task(data, "Solve.").render_prompt(example)
    assert "Solve." in short and "Solve." not in default and short != default


def test_step_check_scorer_rewards_right_arithmetic_only():
    from modern_llm.data.task_datasets import get_task

    scorer = tt.StepCheckScorer(get_task("arithmetic"))
    assert scorer("q", "She has 3 + 9 = 12 cookies.\n#### 12") == 1.0
    assert scorer("q", "She has 3 + 9 = 14 cookies.\n#### 14") == 0.0
    assert scorer("q", "#### 12") == 0.5  # nothing to check
    with pytest.raises(ValueError, match="steps_valid"):
        tt.StepCheckScorer(get_task("sst2"))
    assert tt.TestTimeConfig(score="steps", revise_targets=["best_of_n"]).score == "steps"
