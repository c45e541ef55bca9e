"""From-scratch model code: layers, attention, MoE, the decoder LM and HF conversion."""

from modern_llm.models.transformer import LMOutput, ModernDecoderLM

__all__ = ["LMOutput", "ModernDecoderLM"]
