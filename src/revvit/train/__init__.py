"""Training and evaluation: `fit(TrainConfig, out_dir)`, `evaluate_checkpoint(path, data)`.

config.py (the TrainConfig, YAML recipes, key=value overrides), parts.py (the model, data spec, sampler,
mixup of a run; its errors), optim.py (AdamW groups, warmup+cosine), checkpoint.py (atomic saves, resume,
loading for evaluation), distributed.py (torchrun, samplers), logger.py (JSON/CSV/TensorBoard/PNG),
loop.py (the loop itself), evaluate.py (top-1/top-5, view averaging, evaluating a saved model).
"""
from .config import ConfigError, TrainConfig, apply_overrides, load_config
from .evaluate import evaluate, evaluate_checkpoint
from .loop import fit
from .parts import TrainError, TrainingDiverged

__all__ = ["TrainConfig", "ConfigError", "load_config", "apply_overrides", "fit", "evaluate",
           "evaluate_checkpoint", "TrainError", "TrainingDiverged"]
