"""Training: the one loop (``trainer_base.Trainer``) plus one small module per stage that supplies the loss."""

from modern_llm.config.train_config import TrainConfig
from modern_llm.training.trainer_base import NonFiniteLossError, Trainer, lr_factor, seed_everything

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "lr_factor", "seed_everything"]
