"""PerViT's layers: the position-attention engine, the attention kernel and the gates of their fast paths.

* ``position``: ``PeripheralPosition`` (the one entry point the model calls) and ``PositionConvNet``;
* ``attention``: ``peripheral_sdpa``, the attention kernel with a mask that may need a gradient;
* ``gates``: one predicate per fast path, built on facts (autograd needs, exact module types, dtype, device).
"""
from .attention import peripheral_sdpa
from .position import POS_CACHE_BYTES, POS_MAX_BLOCK_BYTES, PeripheralPosition, PositionConvNet, PositionMemoryError

__all__ = [
    'PeripheralPosition', 'PositionConvNet', 'PositionMemoryError', 'peripheral_sdpa', 'POS_CACHE_BYTES',
    'POS_MAX_BLOCK_BYTES',
]
