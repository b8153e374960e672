"""Layers built from retain's ops: token mixers for memory-augmented sequence models."""

from retain.nn.cached_memory import CachedMemory, CachedMemoryState
from retain.nn.memory_layer import MemoryLayer, MemoryState

__all__ = ["CachedMemory", "CachedMemoryState", "MemoryLayer", "MemoryState"]
