"""Attention maps + sink mass for a prompt: thin wrapper over ``modern_llm.evaluation.attention_viz.main``.

Examples:
  python scripts/attention_viz.py --hf-model smollm2-135m-instruct --prompt "The cat sat on the mat."
  python scripts/attention_viz.py --checkpoint runs/lm-small --prompt "Once upon a time"
"""

from modern_llm.evaluation.attention_viz import main

if __name__ == "__main__":
    raise SystemExit(main())
