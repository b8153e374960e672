"""The replay family: slot choice (reservoir, class-balanced, ring), spaced-replay schedules,
priority trees and multi-field row copies."""

from retain.ops.replay.class_balanced_slots import ClassBalancedState, class_balanced_slots
from retain.ops.replay.gather_rows import gather_rows
from retain.ops.replay.reservoir_slots import reservoir_slots
from retain.ops.replay.ring_slots import ring_slots
from retain.ops.replay.scatter_rows import scatter_rows_
from retain.ops.replay.segment_tree import MinTree, SumTree, importance_weights
from retain.ops.replay.view_batch_indices import view_batch_indices

__all__ = ["ClassBalancedState", "MinTree", "SumTree", "class_balanced_slots", "gather_rows", "importance_weights",
           "reservoir_slots", "ring_slots", "scatter_rows_", "view_batch_indices"]
