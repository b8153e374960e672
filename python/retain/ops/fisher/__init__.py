"""Fisher family: consolidation for continual learning — multi-tensor accumulation of the
diagonal and rank-1 empirical Fisher, MAS importance and SI's path integral, and the EWC penalty
(diagonal, rank-1 or both) with autograd or straight into ``.grad``. Every op takes lists of
tensors (one per parameter) and makes one native pass per (data dtype, state dtype) group. One
module per op; references in ``reference.py``; derivations in csrc/fisher/README.md."""

from retain.ops.fisher.ewc_penalty import ewc_penalty
from retain.ops.fisher.ewc_penalty_grad import ewc_penalty_grad_
from retain.ops.fisher.fisher_accumulate import fisher_accumulate_
from retain.ops.fisher.mas_accumulate import mas_accumulate_
from retain.ops.fisher.rank1_accumulate import rank1_accumulate_
from retain.ops.fisher.rank1_coefficient import rank1_coefficient
from retain.ops.fisher.si_accumulate import si_accumulate_
from retain.ops.fisher.si_consolidate import si_consolidate_

__all__ = ["ewc_penalty", "ewc_penalty_grad_", "fisher_accumulate_", "mas_accumulate_", "rank1_accumulate_",
           "rank1_coefficient", "si_accumulate_", "si_consolidate_"]
