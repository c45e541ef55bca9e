"""modern_llm: pretrain, finetune, align and scale small language models from one readable codebase."""

__version__ = "0.1.0"
