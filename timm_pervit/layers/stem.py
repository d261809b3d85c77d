"""One step of PerViT's conv stem (3x3 stride-2 conv, BatchNorm, ReLU) and its inference form with the norm folded.

In eval mode a BatchNorm is a per-channel affine map; ``conv_bn_eval`` folds it into the conv's weight and bias on
every call (from the current statistics), so the stem runs one conv per step where ``gates.use_folded_stem`` holds.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.models import register_notrace_function

from . import gates

__all__ = ['ConvBnReLU', 'conv_bn_eval']


@register_notrace_function
def conv_bn_eval(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mean: Optional[torch.Tensor],
        var: Optional[torch.Tensor], gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], eps: float,
        stride: Tuple[int, int], padding: Tuple[int, int],
) -> torch.Tensor:
    """``BatchNorm_eval(conv2d(x, weight, bias))`` as one conv: eval-mode BatchNorm is a per-channel affine map, folded
    into the conv's weight and bias (a few thousand values per call, differentiable).

    One node in FX graphs (a registered notrace function; FX wraps only names without a leading underscore): a traced
    model computes exactly what the eager one does and reads the BatchNorm's statistics when it runs, not when it was
    traced.
    """
    assert mean is not None and var is not None
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    shift = -mean if bias is None else bias - mean
    shift = shift * scale if beta is None else torch.addcmul(beta, shift, scale)
    weight = weight * scale.reshape(-1, 1, 1, 1).to(weight.dtype)
    return F.conv2d(x, weight, shift.to(weight.dtype), stride, padding)


class ConvBnReLU(nn.Module):
    """3x3 stride-2 convolution (with bias) -> BatchNorm2d -> ReLU, one step of the conv stem."""

    def __init__(
            self, in_chs: int, out_chs: int, bn_kwargs: Optional[Dict[str, float]] = None, fast_paths: bool = True,
            device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fast_paths = fast_paths
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=2, padding=1, bias=True, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **(bn_kwargs or {}), **dd)
        self.act = nn.ReLU(inplace=True)

    @torch.jit.unused
    def _folds_norm(self) -> bool:
        return gates.use_folded_stem(self)

    @torch.jit.unused
    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        bn, conv = self.bn, self.conv
        x = conv_bn_eval(
            x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, conv.stride,
            conv.padding)
        return self.act(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._folds_norm():
            return self._forward_folded(x)
        return self.act(self.bn(self.conv(x)))
