"""DPO sensitivity grid from a finished alignment-pipeline run; see ``modern_llm.alignment.dpo_sweep``.

python scripts/dpo_sweep.py --pipeline configs/alignment/arithmetic_scratch_strict.yaml --seeds 0,1,2
"""

from modern_llm.alignment.dpo_sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
