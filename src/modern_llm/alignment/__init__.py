"""Alignment: DPO losses, the base -> SFT -> DPO -> verifier-reranking pipeline.

The stage trainers live in ``modern_llm.training`` (``train_sft``, ``train_dpo``, ``train_verifier``); this
package holds what is specific to preference learning and the end-to-end pipeline that chains the stages.
"""

from modern_llm.alignment.dpo_loss import (
    DPOOutput,
    dpo_loss,
    next_token_targets,
    sequence_logprobs,
    token_logprobs,
)

__all__ = ["DPOOutput", "dpo_loss", "next_token_targets", "sequence_logprobs", "token_logprobs"]
