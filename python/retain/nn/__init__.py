"""Layers built from retain's ops: token mixers for memory-augmented sequence models."""

from retain.nn.cached_memory import CachedMemory, CachedMemoryState

__all__ = ["CachedMemory", "CachedMemoryState"]
