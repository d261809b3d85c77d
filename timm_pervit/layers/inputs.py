"""The input check of PerViT: an image batch the model cannot take is refused with the problem and its fix."""
from typing import Optional

import torch

from timm.models import register_notrace_function

from .._compat import autocast_dtype

__all__ = ['MIN_INPUT_SIZE', 'check_image_batch']

#: Smallest accepted input side in pixels: the stem reduces by 16 and the position grid needs >= 2 tokens per axis.
MIN_INPUT_SIZE = 32


@register_notrace_function
def check_image_batch(x: torch.Tensor, in_chans: int, weight_dtype: Optional[torch.dtype] = None) -> None:
    """Raise an error that names the problem and the fix for an input PerViT cannot take.

    Args:
        x: The model input.
        in_chans: Input channels the model was built for.
        weight_dtype: Dtype of the stem's first conv; an input of another dtype is refused unless autocast is on for
            its device (autocast casts both).
    """
    if not isinstance(x, torch.Tensor):
        kind = f'{type(x).__module__}.{type(x).__name__}'
        fix = 'torch.from_numpy(x) (an HWC image also needs .permute(2, 0, 1))' if kind.startswith('numpy.') \
            else "timm's transform: timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))"
        raise TypeError(f'PerViT expects a torch.Tensor image batch (B, C, H, W), got a {kind}; convert it with {fix}.')
    if x.dim() != 4:
        raise ValueError(
            f'PerViT expects a 4-D image batch (B, C, H, W), got a tensor of shape {tuple(x.shape)}; '
            f'add a batch dimension with x.unsqueeze(0) for a single image.')
    if x.shape[1] == 0:
        raise ValueError(
            f'PerViT got an empty image batch with 0 channels (input shape {tuple(x.shape)}); the images were lost '
            f'before the model (check the data pipeline), the model expects {in_chans} channels.')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'PerViT was built for {in_chans} input channels but got {x.shape[1]} (input shape {tuple(x.shape)}); '
            f'create the model with in_chans={x.shape[1]} or convert the images to {in_chans} channels.')
    if x.shape[-2] < MIN_INPUT_SIZE or x.shape[-1] < MIN_INPUT_SIZE:
        raise ValueError(
            f'PerViT needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} px (the 1/16 token grid needs two '
            f'tokens per side), got {x.shape[-2]}x{x.shape[-1]}; resize or pad the input.')
    if not x.is_floating_point():
        raise TypeError(
            f'PerViT expects float images normalized like its training data, got a {x.dtype} tensor; convert it '
            f"with timm's transform (timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))) "
            f"or by hand: x.float() / 255, then normalize with the model's pretrained_cfg mean and std.")
    if weight_dtype is not None and x.dtype != weight_dtype and autocast_dtype(x.device.type) is None:
        raise TypeError(
            f'PerViT input is {x.dtype} but the model is {weight_dtype}: convert the input with x.to({weight_dtype}) '
            f'(or the model with model.to({x.dtype}), or run under torch.autocast).')
