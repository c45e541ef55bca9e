"""base -> SFT -> DPO -> DPO+verifier reranking; see ``modern_llm.alignment.alignment_pipeline``.

python scripts/run_alignment_pipeline.py --config configs/alignment/arithmetic_scratch.yaml [--seeds 0,1,2]
"""

from modern_llm.alignment.alignment_pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
