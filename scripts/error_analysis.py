"""Error categories for a predictions JSONL: thin wrapper over ``modern_llm.evaluation.analysis.main``.

Each line: {"task": "sst2" | "gsm8k" | "samsum" | ..., <example fields>, "prediction": ...}.

Example:
  python scripts/error_analysis.py --predictions experiments/eval/gsm8k_preds.jsonl --model smollm2-135m
"""

from modern_llm.evaluation.analysis import main

if __name__ == "__main__":
    raise SystemExit(main())
