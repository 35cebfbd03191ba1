"""Interoperability: official SlowFast checkpoints and safetensors files.

    revvit.load_slowfast(path, **overrides)   official Rev-ViT / Rev-MViT .pyth -> revvit model (eval, logits)
    revvit.save(model, path)                  weights + model name + kwargs -> .safetensors
    revvit.load(path, **overrides)            .safetensors from revvit, or an official .pyth -> model (eval)
    convert(src, dst)                         .pyth -> .safetensors (the `revvit convert` command)
"""
from .errors import CheckpointError
from .slowfast import load_slowfast, load_slowfast_with_info, read_checkpoint
from .slowfast_config import OFFICIAL_DEFAULTS
from .weights import convert, load, model_spec, read_metadata, save

__all__ = ["CheckpointError", "OFFICIAL_DEFAULTS", "convert", "load", "load_slowfast", "load_slowfast_with_info",
           "model_spec", "read_checkpoint", "read_metadata", "save"]
