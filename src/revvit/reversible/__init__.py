"""The reversible engine: two-stream blocks and their memory-efficient backward. Knows nothing of vision."""
from .buffers import join_streams
from .engine import BACKPROP_MODES, ReversibleBlock, ReversibleStack
from .hooks import recomputing, records_graph
from .walkers import compile_blocks, set_chunking

__all__ = ["BACKPROP_MODES", "ReversibleBlock", "ReversibleStack", "records_graph", "set_chunking", "compile_blocks",
           "join_streams", "recomputing"]
