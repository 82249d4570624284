"""Attention kernels and Ulysses sequence parallelism: pure torch, no model, no config.

`local_attention` runs attention on one device through a named backend; `ulysses_attention` runs it over a
sequence sharded across a torch.distributed process group.
"""

from .local import available_backends, local_attention
from .ulysses import ulysses_attention

__all__ = ["local_attention", "ulysses_attention", "available_backends"]
