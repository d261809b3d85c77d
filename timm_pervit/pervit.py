""" PerViT (Peripheral Vision Transformer)

Paper: `Peripheral Vision Transformer` - https://arxiv.org/abs/2206.06801
    Juhong Min, Yucheng Zhao, Chong Luo, Minsu Cho. NeurIPS 2022.

Official code: https://github.com/juhongm999/pervit

@inproceedings{min2022peripheral,
  title={Peripheral Vision Transformer},
  author={Min, Juhong and Zhao, Yucheng and Luo, Chong and Cho, Minsu},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022}
}

A conv stem brings the image to a single token grid at 1/16 resolution, then 12 transformer blocks with
multi-head peripheral attention (MPA) follow. MPA multiplies the content attention of every head with a learned
peripheral position attention ``phi_p`` (a function of query-key distance, produced by a small conv network that is
shared in shape but not in weights across blocks):

    A = L1-normalize_rows(phi_p * exp(q k^T * scale - rowmax)) == softmax(q k^T * scale + log(phi_p))

The second form runs through ``F.scaled_dot_product_attention`` with ``log(phi_p)`` (computed as a log-sigmoid) as
an additive mask (``fused_attn``); the first, explicit form of the official code stays selectable.

Beyond the official implementation, this one:
* works at any input size >= 32 px per side: the position grid follows the token grid (see ``PeripheralPosition``);
* caches the input-independent position attention at inference (keyed on grid, device, dtype, autocast state and
  the values of the position parameters, so it can never be stale; also reused by torch.compile'd models) and
  recomputes it with gradients in training;
* builds it through the key-query offset grid: the distance projection and the first position conv run once per
  offset instead of once per query and key, the first GroupNorm's statistics come from integral images (exact);
* folds the stem's BatchNorms into their convs at inference (recomputed per call from the current values) and runs
  the MLP's GELU and residual add in place there (without autograd, on plain modules only);
* implements the full timm model API (features, intermediates, grad checkpointing, layer-decay groups, ...).

Written for timm by the timm-pervit authors from the paper and the facts of the official release. Apache-2.0.
"""
import itertools
import logging
import re
import threading
from collections import OrderedDict
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.jit import Final
from torch.nn.utils import prune
from torch.nn.utils.weight_norm import WeightNorm

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import register_notrace_function, register_notrace_module
from timm.models._features import feature_take_indices

from ._attention import _unpacked_sdpa, peripheral_sdpa
from .checkpoint_io import check_floating_point, state_dict_of
from ._compat import (
    LOADS_SAFETENSORS_HUB_FILENAME, autocast_dtype, build_mlp, calculate_drop_path_rates, checkpoint, get_device_dtype,
    is_compiling, is_exporting, is_fx_tracing)
from .paper import OFFICIAL_URL, PAPER_ID, PAPER_NAME, PAPER_RESULTS

__all__ = [
    'PerViT', 'PeripheralPosition', 'PositionConvNet', 'PeripheralAttention', 'PerViTBlock', 'checkpoint_filter_fn',
    'official_to_timm', 'timm_to_official', 'is_official_layout', 'OFFICIAL_KEY_MAP', 'PERVIT_VARIANTS',
    'HF_HUB_NAMESPACE', 'MIN_INPUT_SIZE', 'POS_CACHE_BYTES',
]

_logger = logging.getLogger(__name__)

#: The Hugging Face Hub namespace that holds the converted weights (one place for the whole project).
HF_HUB_NAMESPACE = 'timm-pervit'

#: Smallest accepted input side in pixels: the stem reduces by 16 and the position grid needs >= 2 tokens per axis.
MIN_INPUT_SIZE = 32

#: Default bound of the inference cache of the position attention (``pos_cache_bytes``): pervit_tiny at 640 px or
#: pervit_medium at 448 px still fit, in float32.
POS_CACHE_BYTES = 512 * 2 ** 20

#: Key positions added on each side of the token grid for the position encoding: the two valid 3x3 convs of
#: ``PositionConvNet`` remove them again.
_KEY_PAD = 2

#: Architecture of the released variants: heads, stage widths, stem widths (stage depths are (2, 2, 6, 2)).
PERVIT_VARIANTS: Dict[str, Dict[str, Any]] = {
    'pervit_tiny': dict(num_heads=4, embed_dims=(128, 192, 224, 280), stem_dims=(48, 64, 96, 128)),
    'pervit_small': dict(num_heads=8, embed_dims=(272, 320, 368, 464), stem_dims=(64, 128, 192, 272)),
    'pervit_medium': dict(num_heads=12, embed_dims=(312, 468, 540, 684), stem_dims=(64, 192, 256, 312)),
}


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
            self, in_chs: int, out_chs: int, bn_kwargs: Optional[Dict[str, float]] = None, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=2, padding=1, bias=True, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **(bn_kwargs or {}), **dd)
        self.act = nn.ReLU(inplace=True)

    @torch.jit.unused
    def _folds_norm(self) -> bool:
        """Whether this call may fold the BatchNorm into the conv: eval mode, running statistics, both modules plain
        (no hooks, their own or global, or parametrizations that a direct call would skip), not traced for export.

        FX tracing folds as well, so a traced eval model computes exactly what the eager one does (timm compares them
        for equality); the checks read module attributes only, never traced values.
        """
        bn, conv = self.bn, self.conv
        if self.training or not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
            return False
        return conv.padding_mode == 'zeros' and conv.dilation == (1, 1) and conv.groups == 1 \
            and _is_plain(conv) and _is_plain(bn) and not (is_exporting() or _global_hooks())

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


#: Forward pre-hooks whose effect is a function of the module's own parameters and buffers (pruning masks, the
#: hook-based weight norm): the position cache can key on those tensors' values instead of bypassing itself.
_PURE_PRE_HOOKS: Tuple[type, ...] = (prune.BasePruningMethod, WeightNorm)

#: Module-level registries of hooks that run for every module (``torch.nn.modules.module.register_module_*_hook``).
_GLOBAL_HOOK_REGISTRIES = (
    '_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks', '_global_backward_pre_hooks')


def _has_hooks(module: nn.Module) -> bool:
    """True when calling ``module`` runs hooks (its own), so its forward cannot be replaced by its formula."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _hierarchy_tracker(hook: Any) -> bool:
    """True for a hook of torch's ``ModuleTracker`` (``FlopCounterMode`` and others install it for every module).

    It only records which module is running, to attribute work to it: it does not need to see the position
    modules called one by one, so it must not switch PerViT to another formulation than the one being measured.
    """
    owner = getattr(hook, '__self__', None)
    return type(owner).__module__ == 'torch.utils.module_tracker' and type(owner).__name__ == 'ModuleTracker'


def _global_hooks() -> bool:
    """True when hooks registered for all modules exist: they must see the position modules being called."""
    registry = torch.nn.modules.module
    return any(not _hierarchy_tracker(hook)
               for name in _GLOBAL_HOOK_REGISTRIES for hook in (getattr(registry, name, None) or {}).values())


def _is_plain(module: nn.Module) -> bool:
    """True for a module whose call is exactly its formula on its own parameters (no hooks, no parametrization)."""
    # ``parametrize.is_parametrized``'s own test, written out: torch.compile of torch 2.1 cannot trace a call of
    # that torch function with a module argument, nor ``_modules.get`` (this runs in forward)
    return not (_has_hooks(module) or isinstance(getattr(module, 'parametrizations', None), nn.ModuleDict))


def _has_opaque_hooks(module: nn.Module) -> bool:
    """True when ``module`` runs a hook whose effect is not a function of its parameters and buffers alone."""
    if module._forward_hooks or module._backward_hooks or module._backward_pre_hooks:
        return True
    return any(not isinstance(hook, _PURE_PRE_HOOKS) for hook in module._forward_pre_hooks.values())


def _graph_breaks_allowed() -> bool:
    """While torch.compile traces: whether a graph break is allowed (False under ``fullgraph=True``).

    Evaluated once per trace as a constant (``assume_constant_result``). Where torch does not expose the tracer this
    way, it answers False, and the traced graph recomputes the position attention.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        return not (tx.one_graph or getattr(tx, 'error_on_graph_break', False))
    except Exception:  # noqa: BLE001 - tracer internals differ across torch releases: fall back to no break
        return False


_assume_constant_result = getattr(torch.compiler, 'assume_constant_result', None) \
    or torch._dynamo.assume_constant_result  # torch < 2.2
_graph_breaks_allowed = _assume_constant_result(_graph_breaks_allowed)
_compiler_disable = getattr(torch.compiler, 'disable', None) or torch._dynamo.disable


def _is_plain_channel_norm(m: nn.Module) -> bool:
    """A stock affine GroupNorm with one channel per group and nothing attached (hooks, parametrizations)."""
    return type(m) is nn.GroupNorm and m.num_groups == m.num_channels and m.affine and _is_plain(m)


def _group_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a position GroupNorm on (Nq, C, h, w); while dynamo traces, a plain one-channel-per-group
    GroupNorm is written out as means.

    Why: inductor of torch 2.4 lowers GroupNorm's variance to a Welford reduction divided by ``max(0, numel)``; when
    the numel is symbolic and not provably non-negative (the padded key grid of a token grid that came from floor
    divisions, under dynamic shapes) it emits ``std::max(0.0, <long>)``, C++ that does not build. Means divide by the
    numel itself. Eager calls, and norms with hooks or parametrizations, run the module as such.
    """
    if is_compiling() and _is_plain_channel_norm(norm) and not _global_hooks():
        mean = x.mean((2, 3), keepdim=True)
        d = x - mean
        var = (d * d).mean((2, 3), keepdim=True)
        return d * torch.rsqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]
    return norm(x)


def _box_sums(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Sums of every kh x kw window of x (..., A, B) -> (..., A-kh+1, B-kw+1), from an integral image."""
    c = F.pad(x.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    return c[..., kh:, kw:] - c[..., :-kh, kw:] - c[..., kh:, :-kw] + c[..., :-kh, :-kw]


def _windows(g: torch.Tensor, r0: int, rows: int, kh: int, kw: int) -> torch.Tensor:
    """The windows of rows r0 .. r0+rows-1 of window starts: (rows, w, kh, kw, C), a view of g (2h+1, 2w+1, C)."""
    return g[r0:r0 + rows + kh - 1].unfold(0, kh, 1).unfold(1, kw, 1).permute(0, 1, 3, 4, 2)


def _per_window(t: torch.Tensor, kw: int) -> torch.Tensor:
    """Per-window constants (R, w, C) repeated along the window columns: (R, w, 1, kw, C), dense.

    Against windows (R, w, kh, kw, C), whose last two dims are contiguous in memory, the last two dims of every operand
    then are too: the elementwise kernels run one long inner loop per window row instead of one per C channels.
    """
    return t[:, :, None, None, :].expand(-1, -1, 1, kw, -1).contiguous()


def _affine_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """relu(x * scale + shift) into ``out``: x (R, w, kh, kw, C), scale and shift from ``_per_window``."""
    torch.addcmul(shift, x, scale, out=out)
    return out.relu_()


class _PositionWindows(torch.autograd.Function):
    """The per-query part of a position block, a few rows of queries at a time (see ``forward_offsets``).

    Input: conv1's output on the key-query offset grid, g (2h+1, 2w+1, C) channels-last, and the GroupNorm-1 affine
    of every query's window folded into scale1 and shift1 (h, w, C), indexed by window start. Output: log(phi_p)
    (H, N, N) = logsigmoid(GN2(conv2(relu(window * scale1 + shift1)))). The window of query (a, b) starts at
    (h-1-a, w-1-b), so window starts run in reverse query order.

    A chunk's intermediates (about ``chunk_bytes``) stay cache-sized and are recomputed in backward instead of
    kept: only conv2's output (N x H x N) and GroupNorm-2's statistics are saved.
    """

    #: Bytes of one chunk's conv2 input (at least one row of queries).
    chunk_bytes: int = 1 << 22

    @staticmethod
    def forward(
            ctx: Any, g: torch.Tensor, scale1: torch.Tensor, shift1: torch.Tensor, weight2: torch.Tensor,
            bias2: torch.Tensor, gamma2: torch.Tensor, beta2: torch.Tensor, eps2: float,
    ) -> torch.Tensor:
        h, w, c = scale1.shape
        kh, kw, heads, n = h + 2, w + 2, weight2.shape[0], h * w
        rows = max(1, _PositionWindows.chunk_bytes // (w * kh * kw * c * g.element_size()))
        dd = dict(dtype=g.dtype, device=g.device)
        out = torch.empty(heads, h, w, n, **dd)
        z_all = torch.empty(h * w, heads, h, w, **dd)
        mean_all = torch.empty(h * w, heads, **dd)
        rstd_all = torch.empty_like(mean_all)
        y_buf = torch.empty(min(rows, h), w, kh, kw, c, **dd)  # one buffer for every chunk: no allocation per chunk
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            q = slice(r0 * w, r1 * w)
            y = _affine_relu(
                _windows(g, r0, r1 - r0, kh, kw), _per_window(scale1[r0:r1], kw), _per_window(shift1[r0:r1], kw),
                y_buf[:r1 - r0])
            # channels-last input: the fast layout for a conv with this few channels; its output goes back to NCHW,
            # for GroupNorm-2 (the queries of the chunk are its batch), in the one copy into the saved tensor
            z = z_all[q]
            z.copy_(F.conv2d(y.view(-1, kh, kw, c).permute(0, 3, 1, 2), weight2, bias2))  # (Nc, H, h, w)
            u, mean, rstd = torch.native_group_norm(z, gamma2, beta2, z.shape[0], heads, n, heads, eps2)
            # back to query order: window-start row r is query row h-1-r, and the columns run reversed
            out[:, h - r1:h - r0] = F.logsigmoid(u).view(r1 - r0, w, heads, n).flip(0, 1).permute(2, 0, 1, 3)
            mean_all[q] = mean
            rstd_all[q] = rstd
        ctx.save_for_backward(g, scale1, shift1, weight2, gamma2, beta2, z_all, mean_all, rstd_all)
        ctx.eps2, ctx.rows = eps2, rows
        return out.view(heads, n, n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        g, scale1, shift1, weight2, gamma2, beta2, z_all, mean_all, rstd_all = ctx.saved_tensors
        eps2, rows = ctx.eps2, ctx.rows
        need_g, need_scale, need_shift, need_w2, need_b2, need_gamma, need_beta, _ = ctx.needs_input_grad
        need_y = need_g or need_scale or need_shift
        h, w, c = scale1.shape
        kh, kw, heads, n = h + 2, w + 2, weight2.shape[0], h * w
        grad_out = grad_out.reshape(heads, h, w, n)
        grad_g = torch.zeros_like(g) if need_g else None
        grad_scale = torch.zeros_like(scale1) if need_scale else None
        grad_shift = torch.zeros_like(shift1) if need_shift else None
        grad_w2 = torch.zeros_like(weight2) if need_w2 else None
        grad_b2 = torch.zeros(heads, dtype=weight2.dtype, device=weight2.device) if need_b2 else None
        grad_gamma = torch.zeros_like(gamma2) if need_gamma else None
        grad_beta = torch.zeros_like(beta2) if need_beta else None
        # two buffers for every chunk, no allocation per chunk: the recomputed conv2 input, overwritten with the
        # gradient of its pre-activation, and the product of that gradient with the windows
        y_buf = torch.empty(min(rows, h), w, kh, kw, c, dtype=g.dtype, device=g.device)
        prod_buf = torch.empty_like(y_buf) if need_scale else None
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            q = slice(r0 * w, r1 * w)
            z, mean, rstd = z_all[q], mean_all[q], rstd_all[q]
            u = torch.native_group_norm(z, gamma2, beta2, z.shape[0], heads, n, heads, eps2)[0]  # recomputed
            # d logsigmoid(u) / du = sigmoid(-u)
            # contiguous: called directly (not through autograd, which makes its inputs contiguous), the GroupNorm
            # backward kernel of torch 2.1 reads a strided gradient as if it were dense (wrong gradients, no error)
            du = (grad_out[:, h - r1:h - r0].permute(1, 2, 0, 3).flip(0, 1).reshape(z.shape)
                  * torch.sigmoid(-u)).contiguous()
            dz, dgamma, dbeta = torch.ops.aten.native_group_norm_backward(
                du, z, mean, rstd, gamma2, z.shape[0], heads, n, heads, [True, need_gamma, need_beta])
            if grad_gamma is not None:
                grad_gamma += dgamma
            if grad_beta is not None:
                grad_beta += dbeta
            if not (need_y or need_w2 or need_b2):
                continue
            x = _windows(g, r0, r1 - r0, kh, kw)
            scale = _per_window(scale1[r0:r1], kw)
            y = _affine_relu(x, scale, _per_window(shift1[r0:r1], kw), y_buf[:r1 - r0])  # recomputed, not kept
            dy, dw2, db2 = torch.ops.aten.convolution_backward(
                dz, y.view(-1, kh, kw, c).permute(0, 3, 1, 2), weight2, [heads], [1, 1], [0, 0], [1, 1], False,
                [0, 0], 1, [need_y, need_w2, need_b2])
            if grad_w2 is not None:
                grad_w2 += dw2
            if grad_b2 is not None:
                grad_b2 += db2
            if not need_y:
                continue
            dpre = torch.ops.aten.threshold_backward.grad_input(
                dy.permute(0, 2, 3, 1).view(y.shape), y, 0, grad_input=y)
            if grad_shift is not None:
                grad_shift[r0:r1] = dpre.sum((2, 3))
            if grad_scale is not None and prod_buf is not None:
                grad_scale[r0:r1] = torch.mul(dpre, x, out=prod_buf[:r1 - r0]).sum((2, 3))
            if grad_g is not None:
                dx = dpre.mul_(scale).permute(0, 1, 4, 2, 3)  # (R, w, C, kh, kw)
                rows_in = r1 - r0 + kh - 1
                dx = torch.ops.aten.unfold_backward(dx, [r1 - r0, g.shape[1], c, kh], 1, kw, 1)
                grad_g[r0:r0 + rows_in] += torch.ops.aten.unfold_backward(dx, [rows_in, g.shape[1], c], 0, kh, 1)
        return grad_g, grad_scale, grad_shift, grad_w2, grad_b2, grad_gamma, grad_beta, None


class PositionConvNet(nn.Module):
    """The per-block conv network of the peripheral position encoding.

    Maps the 4H distance features of every query (an image over the (h+4)x(w+4) key grid) to H maps over the inner
    h x w keys: Conv3x3 valid -> GroupNorm(4H groups) -> ReLU -> Conv3x3 valid -> GroupNorm(H groups) -> sigmoid.
    """

    def __init__(self, num_heads: int, eps: float = 1e-5, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        hidden = 4 * num_heads
        self.conv1 = nn.Conv2d(hidden, hidden, kernel_size=3, **dd)
        self.norm1 = nn.GroupNorm(hidden, hidden, eps=eps, **dd)
        self.conv2 = nn.Conv2d(hidden, num_heads, kernel_size=3, **dd)
        self.norm2 = nn.GroupNorm(num_heads, num_heads, eps=eps, **dd)

    def init_weights(self, gate_bias: float, gate_scale: float) -> None:
        """Peripheral initialization: constant convs, GN2 set so that deeper blocks start out more global."""
        for conv in (self.conv1, self.conv2):
            nn.init.constant_(conv.weight, 0.02)
            nn.init.zeros_(conv.bias)
        nn.init.ones_(self.norm1.weight)
        nn.init.zeros_(self.norm1.bias)
        nn.init.constant_(self.norm2.weight, gate_scale)
        nn.init.constant_(self.norm2.bias, gate_bias)

    def forward(
            self,
            x: torch.Tensor,
            proj_weight: Optional[torch.Tensor] = None,
            proj_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Compute ``log(phi_p)``.

        Args:
            x: Query-to-key distances (Nq, 1, h+4, w+4) when the distance projection's weights are given (they are
                folded into conv1), else the projected distance features (Nq, 4H, h+4, w+4).
            proj_weight: Weight of the shared ``Linear(1, 4H)`` distance projection, (4H, 1), to fold into conv1.
            proj_bias: Its bias, (4H,).

        Returns:
            Log position attention, (Nq, H, h, w).
        """
        if proj_weight is not None and proj_bias is not None:
            # conv1(proj(d)) == conv(d, W . a) + (b1 + W . b): the shared 1 -> 4H projection folds exactly into
            # conv1, so conv1 runs on the 1-channel distance map instead of the 4H-channel projection
            conv1_bias = self.conv1.bias
            assert conv1_bias is not None
            w = torch.einsum('oikl,i->okl', self.conv1.weight, proj_weight[:, 0]).unsqueeze(1)
            b = conv1_bias + torch.einsum('oikl,i->o', self.conv1.weight, proj_bias)
            x = F.conv2d(x, w, b)
        else:
            # called as a module: its hooks, pruning masks and parametrizations apply
            x = self.conv1(x)
        if torch.jit.is_scripting():
            x = self.norm2(self.conv2(F.relu(self.norm1(x))))
        else:
            x = _group_norm(self.norm2, self.conv2(F.relu(_group_norm(self.norm1, x))))
        return F.logsigmoid(x)

    @torch.jit.unused
    def forward_offsets(
            self, offsets: torch.Tensor, h: int, w: int, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
    ) -> torch.Tensor:
        """Compute ``log(phi_p)`` (H, h*w, h*w) from the distances of the key-query offset grid, (2h+3, 2w+3).

        The same function as ``forward`` on every query's distance map, computed with its structure: the distance
        from a query to a key depends only on their offset, so conv1 (with the distance projection folded in) runs
        once on the offset grid and every query's (h+2)x(w+2) window of it is a slice; GroupNorm-1 (one channel per
        group) takes each window's statistics from integral images. Only ReLU, conv2, GroupNorm-2 and the
        log-sigmoid run per query, in ``_PositionWindows``. Plain modules only (no hooks, no parametrizations).
        """
        conv1_bias = self.conv1.bias
        assert conv1_bias is not None
        wf = torch.einsum('oikl,i->okl', self.conv1.weight, proj_weight[:, 0]).unsqueeze(1)
        bf = conv1_bias + torch.einsum('oikl,i->o', self.conv1.weight, proj_bias)
        g = F.conv2d(offsets[None, None], wf, bf)[0]  # (C, 2h+1, 2w+1)
        kh, kw = h + 2, w + 2
        # window statistics in float64: a variance from sums of squares would lose digits in float32
        g64 = g.to(torch.float64 if g.device.type != 'mps' else torch.float32)
        mean = _box_sums(g64, kh, kw) / (kh * kw)
        var = (_box_sums(g64 * g64, kh, kw) / (kh * kw) - mean * mean).clamp_min(0)
        scale1 = self.norm1.weight[:, None, None] * torch.rsqrt(var + self.norm1.eps).to(g.dtype)
        shift1 = self.norm1.bias[:, None, None] - mean.to(g.dtype) * scale1
        conv2_bias = self.conv2.bias
        assert conv2_bias is not None
        return _PositionWindows.apply(
            g.permute(1, 2, 0).contiguous(), scale1.permute(1, 2, 0).contiguous(),
            shift1.permute(1, 2, 0).contiguous(), self.conv2.weight, conv2_bias, self.norm2.weight, self.norm2.bias,
            self.norm2.eps)

    @torch.jit.unused
    def supports_offsets(self) -> bool:
        """Whether ``forward_offsets`` computes this block: the stock layers, with no hooks or parametrizations."""
        c1, n1, c2, n2 = self.conv1, self.norm1, self.conv2, self.norm2
        convs = all(
            type(c) is nn.Conv2d and c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (0, 0)
            and c.dilation == (1, 1) and c.groups == 1 and c.bias is not None and _is_plain(c) for c in (c1, c2))
        norms = _is_plain_channel_norm(n1) and _is_plain_channel_norm(n2)
        return convs and norms and _is_plain(self)


class _CacheEntry(NamedTuple):
    """The position attention of one grid, the position modules and copies of the values it was computed from."""
    modules: Tuple[int, ...]
    values: List[torch.Tensor]
    tensors: List[torch.Tensor]
    nbytes: int

    def computed_from(self, modules: Tuple[int, ...], values: List[torch.Tensor]) -> bool:
        """Whether the entry was computed from these modules and exactly these values."""
        return self.modules == modules and len(self.values) == len(values) and all(
            a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(self.values, values))


@register_notrace_module  # reason: caches on grid size and parameter values (Python control flow)
class PeripheralPosition(nn.Module):
    """Peripheral position encoding: ``log(phi_p)`` of every block, shape (H, N, N) each, for an h x w token grid.

    Position grid: token centres sit on normalized coordinates ``linspace(-1, 1, n)`` per axis (n = h or w), and the
    key grid is extended by two positions on each side with the same spacing, so the valid 3x3 convs of each block's
    ``PositionConvNet`` bring it back to h x w. Because coordinates are normalized, the peripheral regions are relative
    to the image: at 448 px a head covers the same fraction of the image as at 224 px (on a finer grid), and for a
    non-square input each axis is normalized on its own. At 224 px (14 x 14 tokens) this is the official encoding.

    At inference (eval mode, or with gradients disabled) the result is cached per grid and reused. An entry is used
    only when the values of the position parameters and buffers (and of every parametrized weight) equal, exactly,
    those it was computed from, and the grid, device, dtype and autocast state match; so an optimizer step,
    ``load_state_dict``, ``.to()``, an edit through ``.data``, a new pruning mask or a parametrization's state change
    all trigger a recompute. The cache keeps at most ``cache_size`` grids and ``cache_bytes`` bytes, evicting the
    least recently used grid (0 for either disables it); a grid larger than ``cache_bytes`` is recomputed on every
    call. One model may serve many threads: a lock guards the cache's bookkeeping, never the computation.

    Under ``torch.compile`` the lookup runs outside the graph (one graph break; the graph takes the cached tensors as
    inputs, so a hit neither rebuilds nor recompiles). With ``fullgraph=True`` no break is possible: the compiled
    graph then recomputes the position attention on every call.

    The build itself goes through the key-query offset grid (``PositionConvNet.forward_offsets``) when every position
    module is a plain, stock layer in float32 or float64 without autocast: the same function, the per-query work
    reduced to ReLU, conv2, GroupNorm-2 and the log-sigmoid. Hooks, pruning and parametrizations on the position
    modules are honoured: then the modules run as such (the shared distance projection is folded into a block's first
    conv only when neither carries any). When a position module has a hook other than a pruning mask or
    ``weight_norm``, the cache is bypassed so the hook sees every call. Hooks registered for all modules
    (``register_module_forward_hook``) make the modules run as such but leave the cache on.

    In training with grad enabled it is recomputed every call, with gradients. In eval mode the cached position
    attention is a constant: gradients still reach the input and all other parameters, but not the position encoder
    (fine-tune it in train mode). The cache is never saved in the state dict, nor pickled or deep-copied.
    """
    __jit_ignored_attributes__ = ['_cache', '_cache_lock', '_warned_cache_bytes', '_state_plan']

    def __init__(
            self,
            num_heads: int,
            depth: int,
            eps: float = 1e-5,
            cache_size: int = 4,
            cache_bytes: int = POS_CACHE_BYTES,
            device=None,
            dtype=None,
    ):
        """
        Args:
            num_heads: Attention heads H.
            depth: Number of blocks (one position conv network each).
            eps: GroupNorm epsilon.
            cache_size: Most token grids whose position attention is kept at inference (0 disables the cache).
            cache_bytes: Most bytes the kept position attention may take (0 disables the cache).
            device: Device of the parameters.
            dtype: Dtype of the parameters.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.num_heads = num_heads
        self.key_pad = _KEY_PAD
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.dist_proj = nn.Linear(1, 4 * num_heads, **dd)
        self.blocks = nn.ModuleList([PositionConvNet(num_heads, eps=eps, **dd) for _ in range(depth)])
        self._cache: 'OrderedDict[Tuple[Any, ...], _CacheEntry]' = OrderedDict()
        self._cache_lock = threading.Lock()
        self._warned_cache_bytes = False
        self._state_plan: Optional[Tuple[Tuple[Any, ...], List[List[int]]]] = None

    def __getstate__(self) -> Dict[str, Any]:
        # a lock can be neither pickled nor deep-copied; the copy starts with an empty cache of its own
        state = super().__getstate__()
        state.pop('_cache_lock', None)
        state['_cache'] = OrderedDict()
        state['_state_plan'] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._cache_lock = threading.Lock()
        self.__dict__.setdefault('_cache', OrderedDict())
        self.__dict__.setdefault('cache_bytes', POS_CACHE_BYTES)
        self.__dict__.setdefault('_warned_cache_bytes', False)
        self.__dict__.setdefault('_state_plan', None)

    def init_weights(self) -> None:
        """Peripheral initialization of the paper (block i of D: GN2 bias linspace(-5, 4), weight linspace(3, .01))."""
        nn.init.constant_(self.dist_proj.weight, -0.02)
        nn.init.zeros_(self.dist_proj.bias)
        depth = len(self.blocks)
        # plain numbers, computed on the CPU whatever the default device (a meta-device build has no values)
        biases = torch.linspace(-5., 4., depth, device='cpu').tolist()
        scales = torch.linspace(3., 0.01, depth, device='cpu').tolist()
        for blk, bias, scale in zip(self.blocks, biases, scales):
            blk.init_weights(gate_bias=bias, gate_scale=scale)

    def distances(self, h: int, w: int) -> torch.Tensor:
        """Euclidean distance from every query (inner h x w grid) to every key of the extended grid.

        Built from integer grid offsets times the grid step ``2 / (n - 1)`` (the spacing of ``linspace(-1, 1, n)``):
        the same values as differences of linspace coordinates up to float rounding, exactly translation invariant,
        and every size is derived from ``torch.arange(n)``, so ``h`` and ``w`` stay symbolic when torch.export or
        torch.onnx trace the model (the exported graph then works at every input size).

        Returns:
            Distances of shape (h*w, 1, h+4, w+4), on the device and in the dtype of the parameters.
        """
        weight = self.dist_proj.weight
        p = self.key_pad
        offsets: List[torch.Tensor] = []
        for n in (h, w):
            query = torch.arange(n, device=weight.device, dtype=weight.dtype)
            key = torch.arange(n + 2 * p, device=weight.device, dtype=weight.dtype) - p
            step = query[-1].reciprocal() * 2.  # a tensor: a Python float of n would be baked into a traced graph
            offsets.append((query.unsqueeze(1) - key.unsqueeze(0)) * step)  # (n, n + 2p): query to key coordinate
        dy = offsets[0][:, None, :, None]
        dx = offsets[1][None, :, None, :]
        return torch.sqrt(dy * dy + dx * dx).flatten(0, 1).unsqueeze(1)

    def offset_distances(self, h: int, w: int) -> torch.Tensor:
        """Distance of every key-query offset, (2h+3, 2w+3): entry (h+1+i, w+1+j) for i rows and j columns apart.

        The query-to-key distances of ``distances`` depend only on the offset (the grid is evenly spaced), so every
        query's (h+4)x(w+4) distance map is a window of this grid.
        """
        weight = self.dist_proj.weight
        dd = {'device': weight.device, 'dtype': weight.dtype}
        dy = torch.arange(-(h + 1), h + 2, **dd) * (2. / (h - 1))
        dx = torch.arange(-(w + 1), w + 2, **dd) * (2. / (w - 1))
        return torch.sqrt(dy[:, None] * dy[:, None] + dx[None, :] * dx[None, :])

    @torch.jit.unused
    def _offsets_path(self, num_blocks: int) -> bool:
        """Whether ``compute`` may take the offset-grid formulation (``PositionConvNet.forward_offsets``)."""
        weight = self.dist_proj.weight
        if is_compiling() or is_exporting() or weight.dtype not in (torch.float32, torch.float64):
            return False  # traced graphs keep the formulation of distances(); low precision keeps its norm kernels
        if autocast_dtype(weight.device.type) is not None or _global_hooks():
            return False
        proj = self.dist_proj
        if not (type(proj) is nn.Linear and proj.in_features == 1 and proj.bias is not None and _is_plain(proj)):
            return False
        return all(blk.supports_offsets() for blk in self.blocks[:num_blocks])

    @torch.jit.unused
    def _compute_offsets(self, h: int, w: int, num_blocks: int) -> List[torch.Tensor]:
        """``compute`` through the offset grid: the same function, with the work shared across queries."""
        offsets = self.offset_distances(h, w)
        weight, bias = self.dist_proj.weight, self.dist_proj.bias
        return [blk.forward_offsets(offsets, h, w, weight, bias) for blk in self.blocks[:num_blocks]]

    def project(self, dist: torch.Tensor) -> torch.Tensor:
        """The shared distance projection as a module on a distance map: (Nq, 1, hk, wk) -> (Nq, 4H, hk, wk)."""
        return self.dist_proj(dist.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    @torch.jit.unused
    def _foldable(self, index: int) -> bool:
        """Whether block ``index`` may fold the distance projection into its first conv (nothing observes them)."""
        return _is_plain(self.dist_proj) and _is_plain(self.blocks[index].conv1) and not _global_hooks()

    def compute(self, h: int, w: int, num_blocks: Optional[int] = None) -> List[torch.Tensor]:
        """Compute ``log(phi_p)`` for the first ``num_blocks`` blocks (all by default), without caching."""
        num_blocks = len(self.blocks) if num_blocks is None else num_blocks
        if not torch.jit.is_scripting() and self._offsets_path(num_blocks):
            return self._compute_offsets(h, w, num_blocks)
        dist = self.distances(h, w)
        feats: Optional[torch.Tensor] = None
        n = h * w
        out: List[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            if i < num_blocks:  # no `break`: TorchScript unrolls ModuleList loops
                if torch.jit.is_scripting() or self._foldable(i):
                    y = blk(dist, self.dist_proj.weight, self.dist_proj.bias)
                else:
                    if feats is None:
                        feats = self.project(dist)
                    y = blk(feats)
                # (N, H, h, w): query, head, key grid
                out.append(y.reshape(n, self.num_heads, n).transpose(0, 1))
        return out

    @torch.jit.unused
    def _state(self) -> Optional[Tuple[Tuple[int, ...], List[torch.Tensor]]]:
        """What the position attention is a function of: the identity of the position modules and their values.

        The values are every parameter and buffer of the position modules, plus the computed value of every
        parametrized tensor (a parametrization may keep state in plain attributes). None when the result depends on
        more than that (a hook other than pruning or weight norm) or when there are no values (meta device).
        """
        modules: List[int] = []
        tensors: List[torch.Tensor] = []
        stack = list(self._modules.values())
        # a plain walk over the submodules: this runs on every cached call, and named_modules() builds name strings
        while stack:
            m = stack.pop()
            if _has_opaque_hooks(m):
                return None
            modules.append(id(m))  # a replaced module (another padding, say) holding equal values is a change too
            tensors += [t for t in m._parameters.values() if t is not None]
            tensors += [t for t in m._buffers.values() if t is not None]
            if isinstance(m._modules.get('parametrizations'), nn.ModuleDict):  # parametrize.is_parametrized(m)
                with torch.no_grad():
                    tensors += [getattr(m, name) for name in m.parametrizations]
            stack.extend(m._modules.values())
        if not tensors or tensors[0].device.type == 'meta':
            return None
        # A few concatenations rather than one comparison per tensor (on CUDA each torch.equal synchronizes): the
        # tensors are grouped by trailing shape, which only changes with the layout, so the grouping is reused
        layout = tuple((t.dtype, t.shape) for t in tensors)
        plan = self._state_plan
        if plan is None or plan[0] != layout:
            groups: Dict[Tuple[Any, ...], List[int]] = {}
            for i, t in enumerate(tensors):
                groups.setdefault((t.shape[1:], t.dtype, t.device), []).append(i)
            plan = self._state_plan = (layout, list(groups.values()))
        with torch.no_grad():
            flat: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
            for idx in plan[1]:
                part = torch.cat([tensors[i] for i in idx]).reshape(-1)
                flat.setdefault((part.dtype, part.device), []).append(part)
            return tuple(modules), [torch.cat(parts) for parts in flat.values()]

    @torch.jit.unused
    def _cached(self, h: int, w: int, num_blocks: int) -> List[torch.Tensor]:
        if self.cache_size <= 0 or self.cache_bytes <= 0:
            return self.compute(h, w, num_blocks)
        state = self._state()
        if state is None:
            return self.compute(h, w, num_blocks)
        modules, values = state
        device, dtype = values[0].device, values[0].dtype
        key = (h, w, device, dtype, autocast_dtype(device.type))
        with self._cache_lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
        if entry is not None and entry.computed_from(modules, values):
            return entry.tensors[:num_blocks]

        # a miss: compute outside the lock (other threads go on; if two compute the same grid, the last one stays).
        # Plain tensors even under inference_mode, so one entry also serves no_grad and eval-mode autograd. `values`
        # were made by torch.cat: a copy, which later in-place edits of the parameters leave alone
        with torch.inference_mode(False), torch.no_grad():
            tensors = [t.contiguous() for t in self.compute(h, w)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors + values)
        with self._cache_lock:
            entries = list(self._cache.items())
        stale = [(k, e) for k, e in entries if not e.computed_from(modules, values)]
        with self._cache_lock:
            for k, e in stale:  # computed from other modules or values: never usable again
                if self._cache.get(k) is e:
                    del self._cache[k]
            if nbytes <= self.cache_bytes:
                self._cache[key] = _CacheEntry(modules, values, tensors, nbytes)
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size or self._cached_bytes() > self.cache_bytes:
                    self._cache.popitem(last=False)  # least recently used first
        if nbytes > self.cache_bytes and not self._warned_cache_bytes:
            self._warned_cache_bytes = True
            _logger.warning(
                f'The position attention of a {h}x{w} token grid takes {nbytes / 2 ** 20:.0f} MiB, more than the '
                f'cache bound of {self.cache_bytes / 2 ** 20:.0f} MiB: it is recomputed on every call. Create the '
                f'model with a larger pos_cache_bytes to keep it.')
        return tensors[:num_blocks]

    @torch.jit.unused
    @_compiler_disable
    def _cached_outside_graph(self, h: int, w: int, num_blocks: int) -> List[torch.Tensor]:
        """``_cached`` run eagerly from a compiled model: a graph break, and the graph takes the tensors as inputs."""
        return self._cached(h, w, num_blocks)

    def _cached_bytes(self) -> int:
        return sum(e.nbytes for e in self._cache.values())

    def cache_info(self) -> Dict[str, int]:
        """Entries and bytes held by the inference cache, and its bounds."""
        with self._cache_lock:
            return dict(
                entries=len(self._cache), bytes=self._cached_bytes(), max_entries=self.cache_size,
                max_bytes=self.cache_bytes)

    def clear_cache(self) -> None:
        """Drop all cached position attention (it is rebuilt on demand)."""
        with self._cache_lock:
            self._cache.clear()

    def forward(self, h: int, w: int, num_blocks: Optional[int] = None) -> List[torch.Tensor]:
        """Return ``log(phi_p)`` of the first ``num_blocks`` blocks for an h x w token grid, each (H, h*w, h*w)."""
        if torch.jit.is_scripting():
            return self.compute(h, w, num_blocks)
        if is_exporting() and not self.training:
            # as in eager eval (built under no_grad for the cache), a constant; a mask requiring grad would also send
            # SDPA to another kernel in torch.onnx's decompositions than in the trace, breaking the traced reshapes
            return [t.detach() for t in self.compute(h, w, num_blocks)]
        if is_exporting() or (self.training and torch.is_grad_enabled()):
            return self.compute(h, w, num_blocks)
        num_blocks = len(self.blocks) if num_blocks is None else num_blocks
        if is_compiling():
            # torch.compile: the lookup runs outside the graph (a graph break), so a compiled model reuses the cache
            # like an eager one; under fullgraph=True no break is possible and the graph recomputes it every call
            if _graph_breaks_allowed():
                return self._cached_outside_graph(h, w, num_blocks)
            return self.compute(h, w, num_blocks)
        return self._cached(h, w, num_blocks)


class PeripheralAttention(nn.Module):
    """Multi-head peripheral attention: content attention reweighted by the position attention ``phi_p``."""

    fused_attn: Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % num_heads == 0, f'dim {dim} must be divisible by num_heads {num_heads}'
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, pos_log: torch.Tensor) -> torch.Tensor:
        """Attend.

        Args:
            x: Tokens (B, N, C).
            pos_log: ``log(phi_p)`` of this block, (H, N, N).
        """
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        # a 4-D (1, H, N, N) mask: with a 3-D one the CPU dispatcher falls back to the slower math kernel
        if self.fused_attn and not torch.jit.is_scripting():
            x = peripheral_sdpa(qkv, pos_log.to(qkv.dtype).unsqueeze(0), self.scale)
        elif self.fused_attn:
            x = _unpacked_sdpa(qkv, pos_log.to(qkv.dtype).unsqueeze(0), self.scale)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            # the official formula: L1-normalized phi_p * exp(logits - rowmax), eps 1e-12
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = torch.exp(attn - attn.amax(dim=-1, keepdim=True)) * torch.exp(pos_log).to(attn.dtype)
            attn = attn / attn.sum(dim=-1, keepdim=True).clamp_min(1e-12)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class PerViTBlock(nn.Module):
    """PerViT block on an NHWC token grid.

    ``x = x + DropPath(MPA(LN1(DWConv(x))))`` (the depthwise conv only feeds the attention branch), then
    ``x = Shortcut(x) + DropPath(MLP(LN2(x)))`` where the MLP and the shortcut (a Linear when the width changes, at
    the last block of a stage) output ``out_dim``.
    """

    def __init__(
            self,
            dim: int,
            out_dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            norm_eps: float = 1e-6,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=True, **dd)
        self.norm1 = norm_layer(dim, eps=norm_eps, **dd)
        self.attn = PeripheralAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, eps=norm_eps, **dd)
        self.mlp = build_mlp(
            Mlp, dim, int(dim * mlp_ratio), out_features=out_dim, act_layer=act_layer, drop=proj_drop, **dd)
        self.shortcut = nn.Linear(dim, out_dim, **dd) if out_dim != dim else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def init_weights(self) -> None:
        """trunc_normal(.02) for the attention and MLP Linears; LayerNorm (1, 0); convs and shortcut: torch defaults."""
        for m in (self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        for m in (self.norm1, self.norm2):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.unused
    def _mlp_in_place(self) -> bool:
        """Whether this call may run the MLP branch on its own fresh tensors in place: GELU over fc1's output and the
        residual added into fc2's output (two activation-sized allocations fewer per block).

        Only at inference without autograd (eval mode, grad disabled), never while traced or compiled, and only when
        nothing could hold a reference to those tensors or expect the bypassed module calls: the stock timm ``Mlp``
        with a stock GELU, identity norm, and no hooks on it or its parts (fc1 and fc2 still run as modules), every
        part in eval mode (Monte Carlo dropout switches the dropouts of an eval model back to train mode).
        """
        if self.training or torch.is_grad_enabled() or is_fx_tracing() or is_compiling() or is_exporting():
            return False
        mlp = self.mlp
        if type(mlp) is not Mlp or type(mlp.act) is not nn.GELU or not isinstance(mlp.norm, nn.Identity):
            return False
        parts = (mlp, mlp.fc1, mlp.act, mlp.drop1, mlp.norm, mlp.fc2, mlp.drop2, self.drop_path2)
        return all(not m.training and _is_plain(m) for m in parts) and not _global_hooks()

    @torch.jit.unused
    def _forward_mlp_in_place(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        hidden = mlp.fc1(self.norm2(x))
        torch.ops.aten.gelu_(hidden, approximate=mlp.act.approximate)
        return mlp.fc2(hidden).add_(self.shortcut(x))

    def forward(self, x: torch.Tensor, pos_log: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.attn(self.norm1(y).reshape(B, H * W, C), pos_log).reshape(B, H, W, C)
        x = x + self.drop_path1(y)
        if not torch.jit.is_scripting() and self._mlp_in_place():
            return self._forward_mlp_in_place(x)
        x = self.shortcut(x) + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class PerViT(nn.Module):
    """Peripheral Vision Transformer.

    Conv stem (4x [3x3 s2 conv, BN, ReLU] + 1x1 conv) to a 1/16 token grid, ``sum(depths)`` PerViT blocks in
    stages whose width changes at the last block of each stage, LayerNorm, average pool, Linear head. Every
    architecture knob is a constructor argument.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            embed_dims: Tuple[int, ...] = (128, 192, 224, 280),
            stem_dims: Tuple[int, ...] = (48, 64, 96, 128),
            num_heads: int = 4,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            norm_eps: float = 1e-6,
            pos_norm_eps: float = 1e-5,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            pos_cache_size: int = 4,
            pos_cache_bytes: int = POS_CACHE_BYTES,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: Number of input image channels.
            num_classes: Number of classes (0 for no head).
            global_pool: 'avg' or '' (no pooling: the head then sees the NHWC map).
            depths: Blocks per stage.
            embed_dims: Width of every stage.
            stem_dims: Output widths of the stride-2 stem convs (their number sets the stem stride, 2**len).
            num_heads: Attention heads (the same in every block).
            mlp_ratio: MLP hidden width over block width.
            qkv_bias: Bias in the qkv projection (False in PerViT).
            norm_eps: LayerNorm epsilon.
            pos_norm_eps: GroupNorm epsilon of the position encoding.
            drop_rate: Dropout before the head.
            proj_drop_rate: Dropout after the attention projection and in the MLP.
            drop_path_rate: Stochastic depth rate, rising linearly from 0 over the blocks.
            pos_cache_size: Most token grids whose position attention is kept at inference (least recently used
                goes first; 0 disables the cache).
            pos_cache_bytes: Most bytes the kept position attention may take (0 disables the cache); one grid takes
                depth x heads x (h*w)^2 values (pervit_tiny: 7.4 MB at 224 px, 118 MB at 448 px, in float32).
            bn_momentum: Momentum of the stem's BatchNorms (torch default 0.1 if None; train.py's --bn-momentum).
            bn_eps: Epsilon of the stem's BatchNorms (torch default 1e-5 if None; train.py's --bn-eps).
            act_layer: MLP activation.
            norm_layer: Token norm layer.
            device: Device of the parameters.
            dtype: Dtype of the parameters.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert global_pool in ('', 'avg'), f"global_pool must be 'avg' or '', got {global_pool!r}"
        assert len(depths) == len(embed_dims), 'need one width per stage'
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_heads = num_heads
        self.output_fmt = 'NHWC'
        self.grad_checkpointing = False
        self.stem_stride = 2 ** len(stem_dims)

        stem: List[nn.Module] = []
        prev = in_chans
        bn_kwargs = {k: v for k, v in (('momentum', bn_momentum), ('eps', bn_eps)) if v is not None}
        for d in stem_dims:
            stem.append(ConvBnReLU(prev, d, bn_kwargs=bn_kwargs, **dd))
            prev = d
        stem.append(nn.Conv2d(prev, embed_dims[0], kernel_size=1, bias=True, **dd))
        self.stem = nn.Sequential(*stem)

        depth = sum(depths)
        dims_in: List[int] = []
        dims_out: List[int] = []
        for s, (d, dim) in enumerate(zip(depths, embed_dims)):
            next_dim = embed_dims[s + 1] if s + 1 < len(embed_dims) else dim
            for j in range(d):
                dims_in.append(dim)
                dims_out.append(next_dim if j == d - 1 else dim)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.pos_attn = PeripheralPosition(
            num_heads, depth, eps=pos_norm_eps, cache_size=pos_cache_size, cache_bytes=pos_cache_bytes, **dd)
        self.blocks = nn.ModuleList([
            PerViTBlock(
                dims_in[i],
                dims_out[i],
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                norm_eps=norm_eps,
                **dd,
            )
            for i in range(depth)
        ])
        self.num_features = self.head_hidden_size = dims_out[-1]
        self.norm = norm_layer(self.num_features, eps=norm_eps, **dd)
        self.feature_info = [
            dict(num_chs=dims_out[i], reduction=self.stem_stride, module=f'blocks.{i}') for i in range(depth)]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.init_weights()

    def init_weights(self) -> None:
        """Peripheral initialization of the paper (see the module docstring of each part)."""
        self.pos_attn.init_weights()
        for blk in self.blocks:
            blk.init_weights()
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The distance embedding of the position encoding is exempt from weight decay, like a ViT pos_attn."""
        return {'pos_attn.dist_proj.weight'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise lr decay: stem (+ shared distance projection), one group per block."""
        return dict(
            stem=r'^stem|^pos_attn\.dist_proj',
            blocks=[(r'^blocks\.(\d+)', None), (r'^pos_attn\.blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ('', 'avg'), f"global_pool must be 'avg' or '', got {global_pool!r}"
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    @torch.jit.ignore
    def position_attention(self, grid_size: Union[int, Tuple[int, int]] = 14) -> torch.Tensor:
        """The peripheral position attention ``phi_p`` of every block for a token grid (detached, for analysis).

        Args:
            grid_size: Token grid (h, w), or one int for a square grid; 224 px input -> 14.

        Returns:
            Tensor (depth, H, h*w, h*w): ``phi[block, head, query, key]`` in (0, 1).
        """
        h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        with torch.no_grad():
            return torch.stack(self.pos_attn.compute(h, w)).exp()

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_batch(x, self.in_chans, self.stem[0].conv.weight.dtype)
        if not self.training:
            # at inference the stem runs channels-last (faster on CPU, and its output is then already the NHWC token
            # grid). Not in training: torch's channels-last BatchNorm gathers batch statistics less precisely than the
            # NCHW kernel (docs/benchmarks.md has the measurements)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stem(x).permute(0, 2, 3, 1)  # NHWC token grid

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates.

        Args:
            x: Input image tensor (B, C, H, W).
            indices: Take last n blocks if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to intermediates that have the final width (the last stage's blocks).
            stop_early: Stop iterating over blocks when last desired intermediate hit.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: Only return intermediate features.

        Returns:
            The final NHWC feature map (after the final norm) and the list of block outputs, or just the list.
        """
        assert output_fmt in ('NCHW', 'NHWC'), 'Output format must be one of NCHW or NHWC.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self._stem(x)
        last = len(self.blocks) if torch.jit.is_scripting() or not stop_early else max_index + 1
        pos = self.pos_attn(x.shape[1], x.shape[2], last)
        for i, blk in enumerate(self.blocks):
            if i < last:  # no `break`: TorchScript unrolls ModuleList loops
                x = blk(x, pos[i])
                if i in take_indices:
                    y = self.norm(x) if norm and x.shape[-1] == self.num_features else x
                    intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Prune blocks (and their position encoders) not needed for the intermediates at ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.pos_attn.blocks = self.pos_attn.blocks[:max_index + 1]
        self.pos_attn.clear_cache()
        self.feature_info = self.feature_info[:max_index + 1]
        width = self.feature_info[-1]['num_chs']
        if prune_norm or width != self.num_features:
            self.norm = nn.Identity()  # the final norm does not fit a narrower last block
        self.num_features = self.head_hidden_size = width
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> normalized token map (B, H/16, W/16, num_features), NHWC."""
        x = self._stem(x)
        pos = self.pos_attn(x.shape[1], x.shape[2])
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, pos[i])
            else:
                x = blk(x, pos[i])
        x = self.norm(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


#: The official checkpoint layout <-> this implementation's, one row per renamed key prefix; ``{i}`` is a block or stem
#: index, ``{n}`` the index of the stem's final 1x1 conv (the number of stride-2 convs). Keys not listed keep their
#: name.
#: The first matching row applies, so specific prefixes come before general ones.
OFFICIAL_KEY_MAP: Tuple[Tuple[str, str], ...] = (
    ('conv_layers.conv_layers.{i}.0.', 'stem.{i}.conv.'),
    ('conv_layers.conv_layers.{i}.1.', 'stem.{i}.bn.'),
    ('conv_layers.conv1x1.', 'stem.{n}.'),
    ('rpe_proj.', 'pos_attn.dist_proj.'),
    ('blocks.{i}.attn.activation.gn1.', 'pos_attn.blocks.{i}.norm1.'),
    ('blocks.{i}.attn.activation.gn2.', 'pos_attn.blocks.{i}.norm2.'),
    ('blocks.{i}.attn.activation.', 'pos_attn.blocks.{i}.'),
    ('blocks.{i}.attn.to_qkv.', 'blocks.{i}.attn.qkv.'),
    ('blocks.{i}.conv.proj.', 'blocks.{i}.dwconv.'),
    ('blocks.{i}.res_path.', 'blocks.{i}.shortcut.'),
)

#: Earlier names of this implementation's keys, accepted by ``checkpoint_filter_fn`` (old -> new prefix).
RENAMED_KEYS: Tuple[Tuple[str, str], ...] = (('pos_embed.', 'pos_attn.'),)


def _prefix_pattern(template: str) -> 're.Pattern[str]':
    return re.compile(re.escape(template).replace(r'\{i\}', r'(?P<i>\d+)').replace(r'\{n\}', r'(?P<n>\d+)'))


def _remap_keys(state_dict: Dict[str, Any], to_official: bool) -> Dict[str, Any]:
    """Rename keys with ``OFFICIAL_KEY_MAP`` in either direction (values untouched)."""
    src, dst = (1, 0) if to_official else (0, 1)
    if to_official:
        n_stem = max(int(k.split('.')[1]) for k in state_dict if k.startswith('stem.'))
    else:
        n_stem = sum(1 for k in state_dict if re.match(r'conv_layers\.conv_layers\.\d+\.0\.weight$', k))
    rows = [(_prefix_pattern(row[src]), row[dst]) for row in OFFICIAL_KEY_MAP]
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, template in rows:
            m = pattern.match(key)
            if m and ('n' not in m.groupdict() or int(m.group('n')) == n_stem):
                new = template.format(i=m.groupdict().get('i'), n=n_stem) + key[m.end():]
                break
        out[new] = value
    return out


def official_to_timm(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Rename the keys of an official PerViT state dict to this implementation's keys (values untouched)."""
    return _remap_keys(state_dict, to_official=False)


def timm_to_official(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Rename the keys of a timm_pervit state dict to the official layout (inverse of ``official_to_timm``)."""
    return _remap_keys(state_dict, to_official=True)


def is_official_layout(state_dict: Dict[str, Any]) -> bool:
    """True for a state dict in the official PerViT key layout."""
    return any(k.startswith(('conv_layers.', 'rpe_proj.')) or '.attn.to_qkv.' in k for k in state_dict)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: PerViT) -> Dict[str, torch.Tensor]:
    """Convert an official PerViT checkpoint (or pass through one of this implementation) for ``model``.

    Accepts a bare state dict or a training checkpoint holding it under 'model' / 'state_dict' (also the names this
    implementation used before, see ``RENAMED_KEYS``). Raises a ValueError when the tensors do not fit the model's
    architecture (naming the released variant the checkpoint belongs to, if it is another one), when it holds NaN or
    Inf values (naming the tensors), or when it is not a state dict at all. The stem's first conv and the classifier
    are not checked: timm adapts them for ``in_chans`` / ``num_classes`` after this filter.
    """
    state_dict = state_dict_of(state_dict, 'the PerViT checkpoint')
    if is_official_layout(state_dict):
        state_dict = official_to_timm(state_dict)
    for old, new in RENAMED_KEYS:
        state_dict = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state_dict.items()}
    check_floating_point(state_dict, model)  # ValueError for integer tensors of floating-point weights
    not_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not_finite:
        raise ValueError(
            f'PerViT checkpoint holds NaN or Inf values in {len(not_finite)} tensor(s): '
            f'{", ".join(not_finite[:8])}{" ..." if len(not_finite) > 8 else ""}. The file is corrupted or comes from '
            f'a diverged training run; load an earlier checkpoint.')
    target = model.state_dict()
    skip = ('stem.0.conv.', 'head.')
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}'
        for k, v in state_dict.items()
        if k in target and not k.startswith(skip) and v.shape != target[k].shape
    ]
    missing_blocks = len(model.blocks) > 0 and f'blocks.{len(model.blocks) - 1}.norm1.weight' not in state_dict
    if mismatched or missing_blocks:
        hint = _variant_hint(state_dict, model)
        detail = '; '.join(mismatched[:4]) + (f' (+{len(mismatched) - 4} more)' if len(mismatched) > 4 else '')
        if missing_blocks:
            detail = (detail + '; ' if detail else '') + f'it has no weights for block {len(model.blocks) - 1}'
        raise ValueError(
            f'PerViT checkpoint does not fit this model ({model.num_heads} heads, width {model.num_features}): '
            f'{hint}Mismatch: {detail}')
    return state_dict


def _variant_hint(state_dict: Dict[str, torch.Tensor], model: 'PerViT') -> str:
    """Name the released variant a mismatching checkpoint belongs to, when it is another one than ``model``'s."""
    widths = {arch['embed_dims'][-1]: name for name, arch in PERVIT_VARIANTS.items()}
    norm = state_dict.get('norm.weight')
    looks_like = widths.get(norm.shape[0]) if norm is not None and norm.dim() == 1 else None
    if looks_like is None or norm.shape[0] == model.num_features:
        return ''
    return f'it looks like a {looks_like} checkpoint: create that model instead. '


def _create_pervit(variant: str, pretrained: bool = False, **kwargs) -> PerViT:
    depths = kwargs.get('depths', (2, 2, 6, 2))
    # plain integers: with a meta default device (``with torch.device('meta')``) a tensor here would hold no values
    default_out = tuple(end - 1 for end in itertools.accumulate(depths))
    out_indices = kwargs.pop('out_indices', default_out)

    def build() -> PerViT:
        return build_model_with_cfg(
            PerViT,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs,
        )

    if not pretrained:
        return build()
    # bounded wait for the hub, and errors of timm's weights loading step that name the problem (not published,
    # offline without cache, corrupted or missing file, ...) and how to convert and load the official release
    from .hub import pretrained_loading, safe_file_overlay
    overlay = kwargs.get('pretrained_cfg_overlay')
    with pretrained_loading(variant, kwargs.get('pretrained_cfg'), overlay, kwargs.get('cache_dir')):
        kwargs['pretrained_cfg_overlay'] = safe_file_overlay(overlay)
        model = build()
    if kwargs['pretrained_cfg_overlay'] is not overlay:
        getattr(model, 'pretrained_cfg', {}).pop('state_dict', None)  # loaded: do not keep the weights twice
    return model


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'min_input_size': (3, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        'pool_size': (14, 14),
        'crop_pct': .875,
        'interpolation': 'bicubic',
        'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0.conv',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': PAPER_ID,
        'paper_name': PAPER_NAME,
        'origin_url': OFFICIAL_URL,
        **kwargs,
    }


def _in1k_cfg(variant: str) -> Dict[str, Any]:
    top1, params, gflops = PAPER_RESULTS[variant]
    # the one file the converter publishes, named where timm can load it by name (without a name timm also asks the
    # hub for pytorch_model.bin when model.safetensors is missing); older timm finds it as the default's safe twin
    hub_file = dict(hf_hub_filename='model.safetensors') if LOADS_SAFETENSORS_HUB_FILENAME else {}
    return _cfg(
        hf_hub_id=f'{HF_HUB_NAMESPACE}/{variant}.in1k',
        **hub_file,
        description=(
            f'{variant} trained on ImageNet-1k at 224 px by the PerViT authors; paper: top-1 {top1}%, '
            f'{params}M params, {gflops} GFLOPs.'),
        notes=(f'top1={top1}', 'Weights converted from the official release with timm_pervit.convert.'),
    )


default_cfgs = generate_default_cfgs({f'{name}.in1k': _in1k_cfg(name) for name in PERVIT_VARIANTS})


@register_model
def pervit_tiny(pretrained: bool = False, **kwargs) -> PerViT:
    """PerViT-T: 4 heads, widths (128, 192, 224, 280), 7.6M params."""
    return _create_pervit('pervit_tiny', pretrained=pretrained, **dict(PERVIT_VARIANTS['pervit_tiny'], **kwargs))


@register_model
def pervit_small(pretrained: bool = False, **kwargs) -> PerViT:
    """PerViT-S: 8 heads, widths (272, 320, 368, 464), 21.3M params."""
    return _create_pervit('pervit_small', pretrained=pretrained, **dict(PERVIT_VARIANTS['pervit_small'], **kwargs))


@register_model
def pervit_medium(pretrained: bool = False, **kwargs) -> PerViT:
    """PerViT-M: 12 heads, widths (312, 468, 540, 684), 43.7M params."""
    return _create_pervit('pervit_medium', pretrained=pretrained, **dict(PERVIT_VARIANTS['pervit_medium'], **kwargs))
