"""Zero-/k-shot prompting baselines graded by the task scorers: wrapper over ``hf.prompting_baselines.main``.

  python scripts/prompting_baselines.py --model smollm2-135m-instruct --task gsm8k --shots 0 4 --limit 100 \
      --data-dir ../shared/data --record-dir experiments/prompting
"""

from modern_llm.hf.prompting_baselines import main

if __name__ == "__main__":
    raise SystemExit(main())
