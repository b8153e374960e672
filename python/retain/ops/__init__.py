"""Public ops. Each is a ``torch.library`` custom op (``retain::<name>``) with fake and autograd
registrations, so it runs in eager mode, under ``torch.compile(fullgraph=True)`` and under
``torch.export``. Every op has a pure-PyTorch reference in ``retain.ops.<family>.reference``.
"""

from retain.ops.scan import delta_rule, gated_delta_rule, linear_attn, linear_recurrence, memory_scan, titans_linear

__all__ = ["delta_rule", "gated_delta_rule", "linear_attn", "linear_recurrence", "memory_scan", "titans_linear"]
