"""Scan family: associative-memory recurrences (memory_scan and its named ops) and the
first-order linear recurrence. One module per op; references in ``reference.py``."""

from retain.ops.scan.delta_rule import delta_rule
from retain.ops.scan.gated_delta_rule import gated_delta_rule
from retain.ops.scan.linear_attn import linear_attn
from retain.ops.scan.linear_recurrence import linear_recurrence
from retain.ops.scan.memory_scan import memory_scan
from retain.ops.scan.titans_linear import titans_linear

__all__ = ["delta_rule", "gated_delta_rule", "linear_attn", "linear_recurrence", "memory_scan", "titans_linear"]
