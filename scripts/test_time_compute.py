"""Test-time compute experiments (self-consistency, verifier reranking, revise-and-retry, calculator tool).

    python scripts/test_time_compute.py --config configs/test_time/arithmetic_scratch.yaml
    python scripts/test_time_compute.py --help

Thin wrapper over ``modern_llm.alignment.test_time.main``.
"""

from modern_llm.alignment.test_time import main

if __name__ == "__main__":
    raise SystemExit(main())
