"""Ablation studies (variants x seeds -> CSV, mean ± std record, plots): wrapper over
``modern_llm.evaluation.ablations.main``.

Examples:
  python scripts/run_ablations.py --config configs/ablations/lm-cpu.yaml
  python scripts/run_ablations.py --base-config configs/lm/tiny-embedded.yaml --no-rope --gqa --moe --seeds 0,1,2
  python scripts/run_ablations.py --config configs/ablations/lm-cpu.yaml --variant learned:pos_encoding=learned
"""

from modern_llm.evaluation.ablations import main

if __name__ == "__main__":
    raise SystemExit(main())
