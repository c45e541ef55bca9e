"""QLoRA-finetune SmolLM2-135M-Instruct (offline via the registry) on GSM8K: wrapper over ``hf.finetune.main``.

  python scripts/finetune_math_gsm8k.py --data-dir ../shared/data --limit 1000 --eval-limit 100 --steps 200
Use --lora for a full-precision base, or --model to pick another causal LM.
"""

import sys

from modern_llm.hf.finetune import main

if __name__ == "__main__":
    raise SystemExit(main(["--model", "smollm2-135m-instruct", "--task", "gsm8k", "--qlora", *sys.argv[1:]]))
