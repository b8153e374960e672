"""Public ops. Each is a ``torch.library`` custom op (``retain::<name>``) with fake and autograd
registrations, so it runs in eager mode, under ``torch.compile(fullgraph=True)`` and under
``torch.export``. Every op has a pure-PyTorch reference in ``retain.ops.<family>.reference``.
"""

from retain.ops.cache import cached_readout, segment_mean
from retain.ops.fisher import (
    ewc_penalty,
    ewc_penalty_grad_,
    fisher_accumulate_,
    mas_accumulate_,
    rank1_accumulate_,
    rank1_coefficient,
    si_accumulate_,
    si_consolidate_,
)
from retain.ops.margin import (
    ActivationStats,
    activation_stats,
    feature_imitation,
    kl_imitation,
    pack_tm_labels,
    tm_loss,
    tm_thresholds,
    unpack_tm_labels,
)
from retain.ops.replay import (
    ClassBalancedState,
    MinTree,
    SumTree,
    class_balanced_slots,
    gather_rows,
    importance_weights,
    reservoir_slots,
    ring_slots,
    scatter_rows_,
    view_batch_indices,
)
from retain.ops.scan import delta_rule, gated_delta_rule, linear_attn, linear_recurrence, memory_scan, titans_linear

__all__ = [
    "ActivationStats", "activation_stats", "feature_imitation", "kl_imitation", "pack_tm_labels", "tm_loss", "tm_thresholds", "unpack_tm_labels",
    "delta_rule", "gated_delta_rule",
    "ewc_penalty", "ewc_penalty_grad_", "fisher_accumulate_", "mas_accumulate_", "rank1_accumulate_", "rank1_coefficient",
    "si_accumulate_", "si_consolidate_",
    "ClassBalancedState", "MinTree", "SumTree", "class_balanced_slots", "gather_rows", "importance_weights",
    "reservoir_slots", "ring_slots", "scatter_rows_", "view_batch_indices", "cached_readout", "segment_mean", "linear_attn", "linear_recurrence", "memory_scan", "titans_linear"]
