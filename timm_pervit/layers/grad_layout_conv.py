"""A ``nn.Conv2d`` whose weight gradient keeps the weight's memory layout (PerViT's depthwise block conv).

A (C, 1, 3, 3) weight is contiguous and channels-last at once; for a channels-last input (the blocks' NHWC grid) the
backward returns its gradient with channels-last strides (9, 1, 3, 1), the same memory order as the weight's
(9, 9, 3, 1), which DistributedDataParallel reports ("Grad strides do not match bucket view strides") and copies.
"""
import torch
import torch.nn as nn

from timm.models import register_notrace_module

from .._compat import is_exporting, is_fx_tracing

__all__ = ['GradLayoutConv2d']


@register_notrace_module  # one call_module node in FX graphs, as a plain nn.Conv2d
class GradLayoutConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight gradient has the weight's strides.

    A same-shape view with the weight's own strides is the same tensor to the convolution (same kernel and result) and
    its backward hands the gradient over in those strides; any other weight layout is passed as it is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        # FX symbolic tracing (the weight is a Proxy, its strides unknown) and export tracing (a graph for inference,
        # which jit.trace's check may record again without autograd) take the conv as it is
        traced = False
        if not torch.jit.is_scripting():
            traced = is_fx_tracing() or is_exporting()
        if not traced and torch.is_grad_enabled() and weight.requires_grad:
            view = weight.view(weight.shape)
            if view.stride() == weight.stride():
                weight = view
        return self._conv_forward(x, weight, self.bias)
