"""Counting PerViT's multiply-accumulates with ``torch.utils.flop_counter``.

``FlopCounterMode`` has formulas for the CUDA attention kernels but not for the CPU flash kernel that
``F.scaled_dot_product_attention`` dispatches to on CPU, so the attention matmuls would silently go uncounted there.
``count_gmacs`` maps that kernel (forward and backward) to torch's own SDPA formulas, locally to one counting run, and
counts the in-place GEMMs (``addmm_``, ``baddbmm_``) that FlopCounterMode has no formula for.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from torch.utils import flop_counter

from ..pervit import PeripheralPosition

__all__ = ['flop_counter_mode', 'count_gmacs']


def _sdpa_cpu_formulas() -> Dict:
    mapping = {}
    aten = torch.ops.aten
    if hasattr(aten, '_scaled_dot_product_flash_attention_for_cpu'):
        def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _forward
    if hasattr(aten, '_scaled_dot_product_flash_attention_for_cpu_backward'):
        def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _backward
    return mapping


def _inplace_matmul_formulas() -> Dict:
    """``addmm_`` and ``baddbmm_``: FlopCounterMode has formulas for the out-of-place ops only (``mm`` with ``out=``
    is counted), and the position build and the CPU attention backward accumulate GEMMs in place."""
    def _addmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def _baddbmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]

    aten = torch.ops.aten
    return {aten.addmm_: _addmm, aten.baddbmm_: _baddbmm}


def flop_counter_mode(**kwargs) -> flop_counter.FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU flash-attention kernel and in-place GEMMs (kwargs go to
    FlopCounterMode)."""
    kwargs.setdefault('display', False)
    custom = dict(_sdpa_cpu_formulas())
    custom.update(_inplace_matmul_formulas())
    custom.update(kwargs.pop('custom_mapping', None) or {})
    return flop_counter.FlopCounterMode(custom_mapping=custom, **kwargs)


def count_gmacs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224), batch_size: int = 1) -> float:
    """GMACs per image of an inference forward (eval mode, the position attention cached as in deployment).

    Args:
        model: The model; it is put in eval mode.
        input_size: (C, H, W) of one image.
        batch_size: Images per forward (the result is divided by it).

    Returns:
        Multiply-accumulates per image, in units of 1e9 (attention matmuls included).
    """
    model.eval()
    param = next(model.parameters())
    x = torch.randn(batch_size, *input_size, device=param.device, dtype=param.dtype)
    # The position attention depends on the grid only, not on the image: it is built once and cached, so it is not
    # per-image work. Its cost is measured around each position module and taken out of the total, because on the
    # meta device (shapes only, no values to key a cache on) it is recomputed in the counted forward.
    position_flops: List[int] = []
    with flop_counter_mode() as counter:
        def _before(module, args):
            position_flops.append(-counter.get_total_flops())

        def _after(module, args, output):
            position_flops[-1] += counter.get_total_flops()

        handles = []
        for module in model.modules():
            if isinstance(module, PeripheralPosition):
                handles += [module.register_forward_pre_hook(_before), module.register_forward_hook(_after)]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for handle in handles:
                handle.remove()
    return (counter.get_total_flops() - sum(position_flops)) / 2 / batch_size / 1e9
