"""Margin family: GeRe's threshold-based margin (TM) loss on replayed activations, its 2-bit label
storage, the mergeable per-dimension activation statistics behind its thresholds, and the
per-token imitation losses (KL on logits, L1/L2 on hidden states). One module per op;
references in ``reference.py``."""

from retain.ops.margin.activation_stats import ActivationStats, activation_stats, tm_thresholds
from retain.ops.margin.feature_imitation import feature_imitation
from retain.ops.margin.kl_imitation import kl_imitation
from retain.ops.margin.tm_labels import pack_tm_labels, unpack_tm_labels
from retain.ops.margin.tm_loss import tm_loss

__all__ = ["ActivationStats", "activation_stats", "feature_imitation", "kl_imitation", "pack_tm_labels", "tm_loss",
           "tm_thresholds", "unpack_tm_labels"]
