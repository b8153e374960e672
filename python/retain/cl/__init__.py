"""Continual-learning strategies composed from ``retain.ops``: GeRe margin replay and the batch
sampler that mixes replay samples into every global batch."""

from retain.cl.gere import GeRe, forward_with_hidden, gere_total_loss
from retain.cl.sampler import ReplayMixSampler

__all__ = ["GeRe", "ReplayMixSampler", "forward_with_hidden", "gere_total_loss"]
