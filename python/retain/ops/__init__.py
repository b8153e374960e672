"""Public ops. Each is a ``torch.library`` custom op (``retain::<name>``) with fake and autograd
registrations, so it runs in eager mode, under ``torch.compile(fullgraph=True)`` and under
``torch.export``. Every op has a pure-PyTorch reference in ``retain.ops.<family>.reference``.
"""

from retain.ops.scan import linear_recurrence

__all__ = ["linear_recurrence"]
