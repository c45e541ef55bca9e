"""LoRA-finetune GPT-2 on SST-2 and grade it with the task's scorer: wrapper over ``modern_llm.hf.finetune.main``.

Defaults: --model gpt2 --task sst2 --lora; any flag can be overridden, e.g. (GPT-2 needs the Hub or a local
folder; offline, pass --model smollm2-135m-instruct or a folder):
  python scripts/finetune_gpt2_sst2.py --data-dir ../shared/data --limit 2000 --steps 300 --record experiments/finetune/gpt2_sst2.json
"""

import sys

from modern_llm.hf.finetune import main

if __name__ == "__main__":
    raise SystemExit(main(["--model", "gpt2", "--task", "sst2", "--lora", *sys.argv[1:]]))
