"""flash-linear-attention's names, signatures, defaults and return values on retain's kernels,
for the CPU (fla has no CPU path) and wherever retain runs: swap ``from fla.ops.gated_delta_rule
import chunk_gated_delta_rule`` for ``from retain.fla import chunk_gated_delta_rule``.

=====================================  ===============================================
fla call                               retain
=====================================  ===============================================
``chunk_linear_attn``,                 ``memory_scan(objective='dot', beta=1)``; ``normalize``
``fused_recurrent_linear_attn``        divides by ``scale·q·cumsum(k)`` (returns ``(S, z)``)
``chunk_simple_gla``,                  ``linear_attn`` with ``g`` [B, T, HV] (+ ``g_gamma`` [HV])
``fused_recurrent_simple_gla``
``chunk_retention``,                   ``linear_attn`` with RetNet's ``log(1 - 2^(-5-h))``
``fused_recurrent_retention``
``chunk_gla``, ``fused_recurrent_gla``  ``linear_attn`` with ``g`` / ``gk`` [B, T, HV, K]
``chunk_delta_rule``,                  ``delta_rule``
``fused_recurrent_delta_rule``
``chunk_gated_delta_rule``,            ``gated_delta_rule`` (+ ``use_gate_in_kernel``,
``fused_recurrent_gated_delta_rule``   ``use_beta_sigmoid_in_kernel``, ``allow_neg_eigval``)
=====================================  ===============================================

Every function: positional order and defaults as fla's; q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``
with HV a multiple of H (grouped value heads, in the kernel: q and k are never repeated);
gates in any floating dtype (float32 gates with bfloat16 q, k, v are read as float32);
``cu_seqlens`` packing; ``initial_state`` / final state ``[N, HV, K, V]`` in float32 (float64 for
float64 inputs), ``[N, HV, V, K]`` with ``state_v_first``; ``reverse`` on the ``fused_recurrent_*``
forms that have it. Accepted and ignored (Triton launch details): ``chunk_size`` (checked as
fla checks it), ``cu_seqlens_cpu``, ``chunk_indices``. Refused with an error naming them: ``gv`` (per-value
decay), ``cp_context``, ``head_first`` (removed from fla). ``chunk_*`` and ``fused_recurrent_*``
of one family compute the same thing here (one fused recurrent kernel, exact in float32).
"""

from retain.fla.delta_rule import (chunk_delta_rule, chunk_gated_delta_rule, fused_recurrent_delta_rule,
                                   fused_recurrent_gated_delta_rule)
from retain.fla.gla import chunk_gla, fused_recurrent_gla
from retain.fla.linear_attn import chunk_linear_attn, fused_recurrent_linear_attn
from retain.fla.simple_gla import (chunk_retention, chunk_simple_gla, fused_recurrent_retention,
                                   fused_recurrent_simple_gla)

__all__ = ["chunk_delta_rule", "chunk_gated_delta_rule", "chunk_gla", "chunk_linear_attn", "chunk_retention",
           "chunk_simple_gla", "fused_recurrent_delta_rule", "fused_recurrent_gated_delta_rule", "fused_recurrent_gla",
           "fused_recurrent_linear_attn", "fused_recurrent_retention", "fused_recurrent_simple_gla"]
