"""DPO training speed: our stage (``training.train_dpo`` on the one Trainer) vs TRL's ``DPOTrainer``.

    python bench/dpo.py                 # CPU -> experiments/bench/dpo_cpu.json
    python bench/dpo.py --steps 30 --batch-size 8 --threads 1

Same tiny Hugging Face Llama (random init, built here and saved once), same tokenizer, same preference
pairs (explicit {"prompt", "chosen", "rejected"} text, no chat template), same batch size, beta, learning
rate, AdamW (betas 0.9/0.999, no weight decay, no clipping, constant LR), fp32 on CPU (TRL needs ``bf16=False`` there), and both with reference log-probs precomputed
once before training (TRL: ``precompute_ref_log_probs=True``), so each step is one policy forward/backward
plus an optimizer step. TRL stacks chosen and rejected sequences into one (2B, T) batch; ours (default
``dpo.share_prompt``) puts each pair in one row, prompt + chosen + rejected with a 4-D mask, so the prompt
is encoded once (TRL 1.16 has no equivalent; its ``padding_free`` is disabled). Pass ``--no-share-prompt``
to time our stacked layout instead.

What is timed: optimizer steps only. Ours: the trainer's own ``train_time_s`` (sum of step times). TRL: a
``TrainerCallback`` measuring ``on_step_begin`` -> ``on_step_end``, which likewise covers data loading of
that step, forward, backward and the optimizer, but not the reference precomputation or the setup.
Steps/s = steps / summed step time over all steps of a run. The two
contenders run alternately ``--repeats`` times (load drift on a shared CPU hits both) and the median is
reported. A sanity column compares the first-step DPO loss of both (it must be ln 2 = 0.6931 for both,
since policy = reference at step 0 and dropout is off), and the reference log-probs both computed for the
same chosen token ids are compared (a cross-check of ``sequence_logprobs`` against TRL on a real model).
Never run by the test suite.

Footgun: TRL tokenises prompt and completion with its own rules (BOS/EOS handling may differ by a token
from ours), so sequence lengths can differ slightly; the record stores both mean lengths.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT_WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def make_pairs(n: int, seed: int) -> list[dict[str, str]]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = (
            "Question: "
            + " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(12, 24)))
            + "\nAnswer:"
        )
        chosen = " " + " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(8, 20)))
        rejected = " " + " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(8, 20)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def gsm8k_pairs(n: int, data_dir: str, seed: int) -> list[dict[str, str]]:
    """Realistic lengths: GSM8K train questions (plain "Question: ...\nAnswer:" prompts), chosen = the
    reference solution, rejected = the same solution with a wrong final number (timing only, not training)."""
    import random

    from modern_llm.data.task_datasets import get_task

    task, rng = get_task("gsm8k"), random.Random(seed)
    rows = []
    for ex in task.load("train", data_dir=data_dir, limit=n):
        gold = task.target_text(ex)
        wrong = gold.rpartition("#### ")[0] + f"#### {rng.randint(1000, 9999)}"
        rows.append({"prompt": task.body(ex), "chosen": " " + gold, "rejected": " " + wrong})
    return rows


def build_model_dir(root: Path, pairs: list[dict[str, str]], hidden: int, layers: int) -> Path:
    """A tiny random Llama + our BPE tokenizer, saved as a plain HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modern_llm.data.tokenizer import train_bpe_tokenizer

    texts = [p["prompt"] + p["chosen"] + p["rejected"] for p in pairs]
    tok = train_bpe_tokenizer(texts, 512)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    folder = root / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_ours(model_dir: Path, pairs, args, out_dir: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modern_llm.config.train_config import TrainConfig
    from modern_llm.data.preference_datasets import PreferencePair
    from modern_llm.training.train_dpo import DPOConfig, encode_pairs, train_dpo

    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prefs = [PreferencePair(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    cfg = TrainConfig(
        out_dir=str(out_dir),
        device="cpu",
        dtype="fp32",
        batch_size=args.batch_size,
        max_steps=args.steps,
        lr=args.lr,
        warmup_steps=0,
        scheduler="constant",
        weight_decay=0.0,
        betas=(0.9, 0.999),  # transformers' AdamW defaults, which TRL uses
        grad_clip=0.0,
        log_every=1,
        progress=False,
        tensorboard=False,
        keep_last_k=1,
        resume="none",
    )
    dpo_cfg = DPOConfig(beta=args.beta, max_length=512, chat=False, share_prompt=args.share_prompt)
    summary = train_dpo(model, tok, prefs, dpo_cfg, cfg)
    with open(out_dir / "metrics.csv") as fh:  # log_every=1: one row per step
        losses = [float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    lengths = [len(it["chosen_ids"]) for it in encode_pairs(prefs, tok, 512, chat=False)]
    return {
        "steps_per_s": summary["step"] / summary["train_time_s"],  # the trainer's summed step times
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "mean_chosen_len": statistics.mean(lengths),
    }


def run_trl(model_dir: Path, pairs, args, out_dir: Path) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            self.times.append(time.perf_counter() - self.t0)

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = DPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        beta=args.beta,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        precompute_ref_log_probs=True,
        disable_dropout=True,
        max_length=512,
        dataloader_num_workers=0,
        seed=0,
    )
    timer = StepTimer()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tok,
        callbacks=[timer],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    data = trainer.train_dataset
    references = {
        tuple(row["prompt_ids"] + row["chosen_ids"]): float(row["ref_chosen_logps"]) for row in data
    }  # TRL's own reference log-probs, keyed by the exact token ids it scored
    lengths = [len(row["prompt_ids"]) + len(row["chosen_ids"]) for row in data]
    return {
        "steps_per_s": len(timer.times) / sum(timer.times),
        "mean_chosen_len": statistics.mean(lengths),
        "references": references,
        "first_loss": float(losses[0]),
        "final_loss": float(losses[-1]),
    }


def our_references(model_dir: Path, pairs) -> dict[tuple[int, ...], float]:
    """Our precomputed reference log-prob of every chosen sequence, keyed by its token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modern_llm.data.preference_datasets import PreferencePair
    from modern_llm.training.train_dpo import encode_pairs, precompute_reference_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    items = encode_pairs(
        [PreferencePair(p["prompt"], p["chosen"], p["rejected"]) for p in pairs], tok, 512, False
    )
    precompute_reference_logps(model, items, tok.pad_token_id)
    return {tuple(it["chosen_ids"]): it["ref_chosen_logps"] for it in items}


def compare_references(ours: dict, theirs: dict) -> dict[str, float]:
    """Same token ids -> same reference log-prob? (cross-checks our sequence log-probs against TRL's)."""
    shared = [ids for ids in ours if ids in theirs]
    diffs = [abs(ours[ids] - theirs[ids]) for ids in shared]
    return {
        "pairs_with_identical_token_ids": len(shared) / max(len(ours), 1),
        "max_abs_ref_logp_diff": max(diffs) if diffs else math.nan,
    }


def main(argv: list[str] | None = None) -> int:
    import trl

    from modern_llm.utils.records import now_iso, write_record

    parser = argparse.ArgumentParser(
        description="DPO steps/s: our trainer vs TRL DPOTrainer (same model + pairs)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--model-dir",
        default=None,
        help="an existing HF model folder (e.g. the SmolLM2 cache) instead of the tiny random Llama",
    )
    parser.add_argument(
        "--gsm8k-pairs",
        default=None,
        metavar="DATA_DIR",
        help="use --pairs GSM8K train questions from DATA_DIR (realistic lengths) instead of random words",
    )
    parser.add_argument(
        "--no-share-prompt",
        dest="share_prompt",
        action="store_false",
        help="time our stacked (2B, T) layout instead of one prompt-shared row per pair",
    )
    parser.add_argument("--out", default="experiments/bench/dpo_cpu.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started, t0 = now_iso(), time.time()
    pairs = gsm8k_pairs(args.pairs, args.gsm8k_pairs, 0) if args.gsm8k_pairs else make_pairs(args.pairs, 0)
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = (
            Path(args.model_dir) if args.model_dir else build_model_dir(root, pairs, args.hidden, args.layers)
        )
        for r in range(args.repeats):
            runs["ours"].append(run_ours(model_dir, pairs, args, root / f"ours{r}"))
            runs["trl"].append(run_trl(model_dir, pairs, args, root / f"trl{r}"))
            print(
                f"repeat {r}: ours {runs['ours'][-1]['steps_per_s']:.2f} steps/s, "
                f"TRL {runs['trl'][-1]['steps_per_s']:.2f} steps/s",
                flush=True,
            )
        reference_check = compare_references(our_references(model_dir, pairs), runs["trl"][0]["references"])
    for run in runs["trl"]:
        run.pop("references")
    ours = statistics.median(x["steps_per_s"] for x in runs["ours"])
    theirs = statistics.median(x["steps_per_s"] for x in runs["trl"])
    metrics = {
        "ours_steps_per_s": ours,
        "trl_steps_per_s": theirs,
        "speedup_ours_over_trl": ours / theirs,
        "ours_first_loss": runs["ours"][0]["first_loss"],
        "trl_first_loss": runs["trl"][0]["first_loss"],
        "ln2": math.log(2),
        "ours_final_loss": runs["ours"][0]["final_loss"],
        "trl_final_loss": runs["trl"][0]["final_loss"],
        "reference_logps_vs_trl": reference_check,
        "per_repeat": runs,
    }
    tiny = f"random LlamaForCausalLM hidden {args.hidden}, {args.layers} layers, 4 heads / 2 KV heads"
    protocol = {
        "model": args.model_dir or tiny,
        "tokenizer": "the model's" if args.model_dir else "project BPE (512) trained on the pairs",
        "pairs": args.pairs,
        "pair_source": "GSM8K train: reference solution vs wrong final number"
        if args.gsm8k_pairs
        else "random words",
        "mean_chosen_tokens_ours": runs["ours"][0]["mean_chosen_len"],
        "mean_chosen_tokens_trl": runs["trl"][0]["mean_chosen_len"],
        "batch_size_pairs": args.batch_size,
        "steps": args.steps,
        "timed": "sum of per-step times over all steps of a run (setup and reference precompute excluded)",
        "repeats": args.repeats,
        "beta": args.beta,
        "lr": args.lr,
        "optimizer": "AdamW betas (0.9, 0.999), no weight decay, no grad clipping, constant LR (both)",
        "final_loss_note": "last logged step's loss; data orders differ between the two trainers",
        "reference": "precomputed once before training (both)",
        "ours_layout": "prompt shared: one row per pair (prompt + chosen + rejected, 4-D mask)"
        if args.share_prompt
        else "stacked: (2B, T), prompt encoded twice (as TRL)",
        "trl_layout": "stacked: (2B, T), prompt encoded twice",
        "dtype": "fp32",
        "torch_threads": args.threads,
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
    }
    out = write_record(
        args.out,
        name="dpo-steps-per-s-cpu",
        task="bench/dpo",
        model=protocol["model"],
        metrics=metrics,
        protocol=protocol,
        seed=0,
        device="cpu",
        dtype="fp32",
        started=started,
        duration_s=time.time() - t0,
    )
    print(f"ours {ours:.2f} steps/s vs TRL {theirs:.2f} steps/s (x{ours / theirs:.2f}); record: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
