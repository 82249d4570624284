"""Attention kernels, Ulysses and ring sequence parallelism: pure torch, no model, no config.

`local_attention` runs attention on one device through a named backend (`local_attention_lse` also returns the
log-sum-exp); `ulysses_attention` and `ring_attention` run it over a sequence sharded across a torch.distributed
process group, and `ulysses_attention(..., ring_group=...)` runs both (Ulysses x Ring).
"""

from .local import available_backends, local_attention, local_attention_lse
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["local_attention", "local_attention_lse", "ring_attention", "ulysses_attention", "available_backends"]
