"""Evaluation: metric definitions (``metrics``, numpy-only) and the analyses built on them.

Import submodules directly (``from modern_llm.evaluation.metrics import accuracy``); this package file imports
nothing so that loading a light module never pulls in plotting or model code.
"""
