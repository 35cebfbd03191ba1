"""Training and evaluation: `fit(TrainConfig, out_dir)`, `evaluate_checkpoint(path, data)`.

config.py (the TrainConfig, YAML recipes, key=value overrides), optim.py (AdamW groups, warmup+cosine),
checkpoint.py (atomic saves, resume, final weights), distributed.py (torchrun, samplers), logger.py
(JSON/CSV/TensorBoard/PNG), loop.py (the loop itself).
"""
from .config import ConfigError, TrainConfig, apply_overrides, load_config
from .loop import TrainError, TrainingDiverged, evaluate, evaluate_checkpoint, fit

__all__ = ["TrainConfig", "ConfigError", "load_config", "apply_overrides", "fit", "evaluate",
           "evaluate_checkpoint", "TrainError", "TrainingDiverged"]
