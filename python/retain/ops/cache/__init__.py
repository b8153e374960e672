"""The cache family (memory caching: recurrent memories that grow with the sequence). Landed so
far: segment summaries and the reference readout; the fused ``cached_readout`` op and
``retain.nn.CachedMemory`` follow (issue 12)."""

from retain.ops.cache.segment_mean import segment_mean

__all__ = ["segment_mean"]
