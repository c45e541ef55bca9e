"""``modern-llm <verb>``: one verb per stage. Each verb's options come from the module that implements it,
so ``modern-llm <verb> --help`` is always that stage's real, current interface.

Verbs are resolved lazily (``module:function``) so ``modern-llm --help`` stays instant and a verb's heavy
imports (transformers, peft, ...) load only when it runs.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (implementation "module:function", one-line help). Each function takes argv and returns an exit code.
VERBS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "modern_llm.quickstart:main",
        "the whole lifecycle on embedded data + a report card (~10 min)",
    ),
    "train-lm": (
        "modern_llm.training.train_lm:main",
        "pretrain ModernDecoderLM on a corpus (configs/lm/*.yaml)",
    ),
    "prepare-data": (
        "modern_llm.data.lm_datasets:main",
        "tokenise + cache a corpus (optionally train a BPE)",
    ),
    "synth-arithmetic": ("modern_llm.data.synthetic:main", "write the synthetic multi-step arithmetic task"),
    "generate": (
        "modern_llm.inference.cli:generate_main",
        "stream a completion from a checkpoint or HF model",
    ),
    "chat": ("modern_llm.inference.cli:chat_main", "multi-turn chat with the tokenizer's chat template"),
    "sft": (
        "modern_llm.training.train_sft:main",
        "supervised finetuning (prompt tokens masked), scratch or HF",
    ),
    "dpo": (
        "modern_llm.training.train_dpo:main",
        "DPO on preference pairs (our loss, precomputed reference)",
    ),
    "train-verifier": (
        "modern_llm.training.train_verifier:main",
        "train a P(correct) verifier on labelled samples",
    ),
    "align": (
        "modern_llm.alignment.alignment_pipeline:main",
        "base -> SFT -> DPO -> verifier pipeline + stage table",
    ),
    "dpo-sweep": (
        "modern_llm.alignment.dpo_sweep:main",
        "re-train a pipeline run's DPO stage over an lr x NLL-weight grid",
    ),
    "test-time": (
        "modern_llm.alignment.test_time:main",
        "self-consistency, best-of-N, revise-and-retry, tools",
    ),
    "long-context": ("modern_llm.evaluation.long_context:main", "PPL vs context length: dense/window/sinks"),
    "ablations": (
        "modern_llm.evaluation.ablations:main",
        "toggle features over seeds; CSV/JSON/PNG mean ± std",
    ),
    "report-tables": ("modern_llm.evaluation.report_tables:main", "render report tables from experiments/"),
    "serve": ("modern_llm.serve:main", "local web chat: streaming tokens, verifier score, alternatives"),
    "prompt-baseline": (
        "modern_llm.hf.prompting_baselines:main",
        "zero/k-shot prompting baselines for a task",
    ),
    "hf-finetune": ("modern_llm.hf.finetune:main", "LoRA/QLoRA/full finetuning of a HF model on a task"),
    "hf-experiments": ("modern_llm.hf.experiments:main", "reproduce the SmolLM2 SST-2/GSM8K/SAMSum results"),
    "attention-viz": ("modern_llm.evaluation.attention_viz:main", "attention heatmaps + sink-mass figure"),
    "error-analysis": ("modern_llm.evaluation.analysis:main", "categorise errors in a predictions JSONL"),
    "export-hf": ("modern_llm.models.hf_convert:export_main", "export a checkpoint to a Hugging Face folder"),
    "import-hf": (
        "modern_llm.models.hf_convert:import_main",
        "import a Llama/Mixtral HF folder as a checkpoint",
    ),
}


def usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = [
        "usage: modern-llm <verb> [options]      (modern-llm <verb> --help for a verb's options)",
        "",
        "verbs:",
    ]
    lines += [f"  {verb:<{width}}  {text}" for verb, (_, text) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb in {"-V", "--version"}:
        from modern_llm import __version__

        print(__version__)
        return 0
    if verb not in VERBS:
        print(f"modern-llm: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name = VERBS[verb][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
