"""PerViT's layers: the position-attention engine, the attention kernel, the stem and the gates of their fast paths.

* ``position``: ``PeripheralPosition`` (the one entry point the model calls) and ``PositionConvNet``;
* ``attention``: ``peripheral_sdpa``, the attention kernel with a mask that may need a gradient;
* ``stem``: ``ConvBnReLU``, one stem step, and ``conv_bn_eval``, its inference form with the BatchNorm folded in;
* ``grad_layout_conv``: ``GradLayoutConv2d``, the block's depthwise conv with a weight gradient in the weight's layout;
* ``inputs``: ``check_image_batch``, the input check that names the problem and its fix;
* ``gates``: one predicate per fast path, built on facts (autograd needs, exact module types, dtype, device).
"""
from .attention import peripheral_sdpa
from .grad_layout_conv import GradLayoutConv2d
from .inputs import MIN_INPUT_SIZE, check_image_batch
from .position import POS_CACHE_BYTES, POS_MAX_BLOCK_BYTES, PeripheralPosition, PositionConvNet, PositionMemoryError
from .stem import ConvBnReLU, conv_bn_eval

__all__ = [
    'PeripheralPosition', 'PositionConvNet', 'PositionMemoryError', 'peripheral_sdpa', 'POS_CACHE_BYTES',
    'POS_MAX_BLOCK_BYTES', 'ConvBnReLU', 'conv_bn_eval', 'GradLayoutConv2d', 'MIN_INPUT_SIZE', 'check_image_batch',
]
