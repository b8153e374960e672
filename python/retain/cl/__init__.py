"""Continual-learning strategies composed from ``retain.ops``: the replay buffer (reservoir, ring,
class-balanced, prioritized; checkpointable, sharded), GeRe margin replay and the batch sampler
that mixes replay samples into every global batch; EWC (diagonal, rank-1, online), SI and MAS;
``metrics``: ACC, BWT, FWT, forgetting and the streaming min-ACC / WC-ACC."""

from retain.cl import metrics
from retain.cl.ewc import EWC
from retain.cl.gere import GeRe, forward_with_hidden, gere_total_loss
from retain.cl.mas import MAS
from retain.cl.replay_buffer import ReplayBuffer
from retain.cl.si import SI
from retain.cl.sampler import ReplayMixSampler

__all__ = ["metrics", "EWC", "GeRe", "MAS", "SI", "ReplayBuffer", "ReplayMixSampler", "forward_with_hidden", "gere_total_loss"]
