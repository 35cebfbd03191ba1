"""Memory meter and benchmarks: reversible vs autograd vs activation checkpointing, measured in one run."""
from .benchmark import Result, format_table, run_benchmark
from .memory import MemoryReport, StorageMeter, measure_training_memory, memory_table, track_peak_memory

__all__ = ["MemoryReport", "StorageMeter", "measure_training_memory", "memory_table", "track_peak_memory", "Result",
           "format_table", "run_benchmark"]
