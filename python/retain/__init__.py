"""retain: fast memory primitives for PyTorch.

Associative-memory scans and continual-learning kernels as ``torch.library`` custom ops with
C++ (CPU, OpenMP) and CUDA kernels. ``import retain`` imports torch and nothing optional, and
initialises no CUDA context.

Examples::

    >>> import torch, retain
    >>> a, x = torch.rand(2, 16, 8), torch.randn(2, 16, 8)
    >>> h = retain.ops.linear_recurrence(a, x)   # h_t = a_t * h_{t-1} + x_t
    >>> h.shape
    torch.Size([2, 16, 8])
"""

from retain import cl, fla, nn, ops
from retain._native import capabilities, cpu_capabilities, cpu_capability, native_available, set_cpu_capability

__version__ = "0.1.0"

__all__ = ["cl", "fla", "nn", "ops", "capabilities", "cpu_capabilities", "cpu_capability", "native_available",
           "set_cpu_capability", "__version__"]
