"""The cache family (memory caching: recurrent memories that grow with the sequence): segment
summaries and the fused readout over cached memory states (csrc/cache/README.md)."""

from retain.ops.cache.cached_readout import cached_readout
from retain.ops.cache.segment_mean import segment_mean

__all__ = ["cached_readout", "segment_mean"]
