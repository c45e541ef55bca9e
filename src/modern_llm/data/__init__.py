"""Data: tokenizers, language-modelling corpora and task/preference datasets.

Modules are imported explicitly (``from modern_llm.data.tokenizer import load_tokenizer``); this package file
imports nothing so that ``import modern_llm.data.<x>`` never pulls in transformers or datasets by accident.

- ``tokenizer``: train/load byte-level BPE tokenizers in Hugging Face format, chat template, offline GPT-2 BPE.
- ``lm_datasets``: pretraining corpora by name, cached token files, packed next-token datasets.
"""
