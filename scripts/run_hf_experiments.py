"""Prompting baselines vs LoRA/QLoRA on SST-2, GSM8K and SAMSum (records, log, SUMMARY.md): wrapper over
``modern_llm.hf.experiments.main``.

  MODERN_LLM_DATA_DIR=../shared/data python scripts/run_hf_experiments.py --config configs/hf/smollm2_cpu.yaml
  python scripts/run_hf_experiments.py --config configs/hf/smollm2_cpu.yaml --only sst2-lora --force
  python scripts/run_hf_experiments.py --summary-only
"""

from modern_llm.hf.experiments import main

if __name__ == "__main__":
    raise SystemExit(main())
