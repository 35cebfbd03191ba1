"""Memory meter and benchmarks: reversible vs autograd vs activation checkpointing, measured in one run."""
from .memory import MemoryReport, StorageMeter, measure_training_memory, track_peak_memory

__all__ = ["MemoryReport", "StorageMeter", "measure_training_memory", "track_peak_memory"]
