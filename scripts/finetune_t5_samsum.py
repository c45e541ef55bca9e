"""LoRA-finetune T5-small on SAMSum (ROUGE): wrapper over ``modern_llm.hf.finetune.main``.

Only SAMSum's test split exists in ../shared/data, so train and evaluate on disjoint slices and say so:
  python scripts/finetune_t5_samsum.py --data-dir ../shared/data --train-split "test[:600]" --eval-split "test[600:]"
Online, the defaults use the real train/test splits (Hub knkarthick/samsum).
"""

import sys

from modern_llm.hf.finetune import main

if __name__ == "__main__":
    raise SystemExit(main(["--model", "t5-small", "--task", "samsum", "--lora", *sys.argv[1:]]))
