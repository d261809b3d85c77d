"""The peripheral position attention of PerViT: ``log(phi_p)`` of every block, built, cached and differentiated.

``PeripheralPosition`` is the one entry point the model calls (``pos_attn(h, w)``). It owns the shared distance
projection and one ``PositionConvNet`` per block, and chooses between

* the plain path: every query's distance map through the modules as such (``compute`` when no gate below holds);
* the offset-grid build (``PositionConvNet.forward_offsets`` with ``_PositionWindows``): the same function with the
  work shared across queries (gate ``gates.use_offset_build``);
* the folded projection: the distance projection folded into conv1 (gate ``gates.use_folded_projection``);
* the inference cache, keyed on the values it was computed from (gate ``gates.use_position_cache``); when the whole
  model's position attention does not fit its bound, the blocks are built one at a time as they are used.

Paper: `Peripheral Vision Transformer` - https://arxiv.org/abs/2206.06801
"""
import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.models import register_notrace_module

from .._compat import autocast_dtype, is_compiling, is_exporting
from . import gates
from .attention import differentiable_grads

__all__ = [
    'PeripheralPosition', 'PositionConvNet', 'PositionMemoryError', 'POS_CACHE_BYTES', 'POS_MAX_BLOCK_BYTES',
    'POS_CHUNK_BYTES', 'KEY_PAD', 'token_distances',
]

_logger = logging.getLogger(__name__)

#: Default bound of the inference cache of the position attention (``cache_bytes``): in float32, the whole model's
#: fits up to 768 px for pervit_tiny, 640 px for pervit_small and 576 px for pervit_medium (docs/model.md).
POS_CACHE_BYTES = 2 ** 30

#: Default bound of one block's position attention (``max_block_bytes``): heads x (h*w)^2 values; pervit_tiny reaches
#: it near 2400 px. A larger input gets a ``PositionMemoryError`` before anything is allocated.
POS_MAX_BLOCK_BYTES = 8 * 2 ** 30

#: Default working-set bytes of one chunk of queries in the offset-grid build (``chunk_bytes``): cache-sized.
POS_CHUNK_BYTES = 1 << 21

#: Key positions added on each side of the token grid for the position encoding: the two valid 3x3 convs of
#: ``PositionConvNet`` remove them again.
KEY_PAD = 2


def _grid_offsets(n: int, steps: torch.Tensor) -> torch.Tensor:
    """Offsets counted in grid steps, in normalized coordinates: the step of ``linspace(-1, 1, n)`` is 2 / (n - 1),
    taken as a tensor (a Python float of n would be baked into a traced graph)."""
    return steps * (torch.arange(n, device=steps.device, dtype=steps.dtype)[-1].reciprocal() * 2.)


def _distance(dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(dy * dy + dx * dx)


def token_distances(h: int, w: int, key_pad: int = 0, device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Euclidean distance from every token of an h x w grid to every key of the grid extended by ``key_pad``
    positions on each side, in the model's normalized coordinates (token centres on ``linspace(-1, 1, n)`` per axis,
    so an image side has length 2), (h*w, h+2p, w+2p), queries in row-major order.

    Built from integer grid offsets times the grid step: exactly translation invariant, and every size is derived
    from ``torch.arange(n)``, so ``h`` and ``w`` stay symbolic when torch.export or torch.onnx trace the model.
    """
    axes = []
    for n in (h, w):
        query = torch.arange(n, device=device, dtype=dtype)
        key = torch.arange(n + 2 * key_pad, device=device, dtype=dtype) - key_pad
        axes.append(_grid_offsets(n, query.unsqueeze(1) - key.unsqueeze(0)))  # (n, n + 2p): query to key
    return _distance(axes[0][:, None, :, None], axes[1][None, :, None, :]).flatten(0, 1)


class PositionMemoryError(MemoryError):
    """The position attention of one block would exceed ``max_block_bytes`` (raised before allocating it)."""


def _graph_breaks_allowed() -> bool:
    """While torch.compile traces: whether a graph break is allowed (False under ``fullgraph=True``).

    Evaluated once per trace as a constant (``assume_constant_result``). Reads dynamo's tracer (private: no public
    API tells); where torch does not expose it this way, it answers False and the traced graph recomputes the
    position attention.
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


def _group_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a position GroupNorm on (Nq, C, h, w); while dynamo traces, a plain one-channel-per-group
    GroupNorm is written out as means.

    Why: inductor of torch 2.4 lowers GroupNorm's variance to a Welford reduction divided by ``max(0, numel)``; when
    the numel is symbolic and not provably non-negative (the padded key grid of a token grid that came from floor
    divisions, under dynamic shapes) it emits ``std::max(0.0, <long>)``, C++ that does not build. Means divide by the
    numel itself. Eager calls, and norms with hooks or parametrizations, run the module as such.
    """
    if is_compiling() and gates.is_plain_channel_norm(norm) and not gates.global_hooks():
        mean = x.mean((2, 3), keepdim=True)
        d = x - mean
        var = (d * d).mean((2, 3), keepdim=True)
        return d * torch.rsqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]
    return norm(x)


def _box_sums(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Sums of every kh x kw window of x (..., A, B) -> (..., A-kh+1, B-kw+1), from an integral image."""
    c = F.pad(x.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    return c[..., kh:, kw:] - c[..., :-kh, kw:] - c[..., kh:, :-kw] + c[..., :-kh, :-kw]


def _chunks(h: int, w: int, queries: int) -> Iterator[Tuple[int, int, int, int]]:
    """Window-start ranges ``(r0, r1, s0, s1)`` of about ``queries`` windows each: whole rows, or parts of one row."""
    if queries >= w:
        rows = queries // w
        for r0 in range(0, h, rows):
            yield r0, min(h, r0 + rows), 0, w
    else:
        for r0 in range(h):
            for s0 in range(0, w, queries):
                yield r0, r0 + 1, s0, min(w, s0 + queries)


def _pre_activation(
        windows: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, r0: int, r1: int, s0: int, s1: int,
        out: torch.Tensor) -> torch.Tensor:
    """relu(window * scale + shift) of window starts [r0, r1) x [s0, s1) into ``out`` (C, R, S, kh, kw).

    A multiply and an in-place add: with the per-window constants broadcast over the window, about twice as fast as
    one ``addcmul``."""
    torch.mul(windows[:, r0:r1, s0:s1], scale[:, r0:r1, s0:s1, None, None], out=out)
    return out.add_(shift[:, r0:r1, s0:s1, None, None]).relu_()


class _PositionWindows(torch.autograd.Function):
    """The per-query part of a position block, a chunk of queries at a time (see ``forward_offsets``).

    Input: conv1's output on the key-query offset grid, g (C, 2h+1, 2w+1), and the GroupNorm-1 affine of every
    query's (h+2)x(w+2) window of it folded into scale1 and shift1 (C, h, w), indexed by window start. Output:
    log(phi_p) (H, N, N) = logsigmoid(GN2(conv2(relu(window * scale1 + shift1)))). The window of query (a, b) starts
    at (h-1-a, w-1-b), so window starts run in reverse query order.

    Layout: a chunk's conv2 inputs lie channel-major and flat, (C, windows x (h+2)(w+2)), so conv2 is nine GEMMs of
    (H, C) by shifted views of that one buffer (output column p of a window reads input column p + di*(w+2) + dj for
    tap (di, dj)); the columns that run past a window's last valid row or column are computed and discarded. The
    GEMMs see the whole chunk at once instead of one small image per query, and nothing is copied into patches. The
    backward runs the same way: conv2's input gradient as one GEMM over the nine shifted copies of the (H-channel)
    output gradient, its weight gradient as one GEMM with the same copies.

    A chunk (about ``chunk_bytes`` of conv2 input) stays cache-sized and is recomputed in backward instead of kept:
    only conv2's output (H x N x N) and GroupNorm-2's statistics are saved, and only when a gradient is needed. Its
    backward is differentiable when autograd records it (second-order gradients), through ``plain``.
    """

    @staticmethod
    def forward(
            ctx: Any, g: torch.Tensor, scale1: torch.Tensor, shift1: torch.Tensor, weight2: torch.Tensor,
            bias2: torch.Tensor, gamma2: torch.Tensor, beta2: torch.Tensor, eps2: float, chunk_bytes: int,
    ) -> torch.Tensor:
        c, h, w = scale1.shape
        kh, kw, heads, n = h + 2, w + 2, weight2.shape[0], h * w
        win = kh * kw
        queries = max(1, chunk_bytes // (c * win * g.element_size()))
        dd = dict(dtype=g.dtype, device=g.device)
        save = any(ctx.needs_input_grad)
        out = torch.empty(heads, h, w, n, **dd)
        z_all = torch.empty(heads, h, w, h, w, **dd) if save else None  # by window start
        mean_all = torch.empty(heads, h, w, **dd)
        rstd_all = torch.empty_like(mean_all)
        taps = weight2.permute(2, 3, 0, 1).reshape(9, heads, c).contiguous()
        offs = [di * kw + dj for di in range(3) for dj in range(3)]
        windows = g.unfold(1, kh, 1).unfold(2, kw, 1)  # (C, h, w, kh, kw), a view
        cap = min(queries, n) if queries < w else min(queries // w, h) * w
        y_buf = torch.zeros(c, cap * win + offs[-1], **dd)  # the tail past the last window is read, never used
        z_buf = torch.empty(heads, cap * win, **dd)
        ls_buf = torch.empty(heads * cap * n, **dd)
        for r0, r1, s0, s1 in _chunks(h, w, queries):
            nq = (r1 - r0) * (s1 - s0)
            cols = nq * win
            y = y_buf[:, :cols].view(c, r1 - r0, s1 - s0, kh, kw)
            _pre_activation(windows, scale1, shift1, r0, r1, s0, s1, y)
            z = z_buf[:, :cols]
            # conv2's bias is left out: GroupNorm-2 subtracts each (query, head) mean, which removes it exactly
            torch.mm(taps[0], y_buf[:, :cols], out=z)
            for t in range(1, 9):
                z.addmm_(taps[t], y_buf[:, offs[t]:offs[t] + cols])
            z = z.view(heads, r1 - r0, s1 - s0, kh, kw)[..., :h, :w]
            # GroupNorm-2 per query and head over its h x w keys, two-pass statistics
            mean = z.mean((3, 4))
            d = z - mean[..., None, None]
            rstd = torch.rsqrt(d.square().mean((3, 4)) + eps2)
            mean_all[:, r0:r1, s0:s1] = mean
            rstd_all[:, r0:r1, s0:s1] = rstd
            if z_all is not None:
                z_all[:, r0:r1, s0:s1] = z
            # back to query order (window-start row r is query row h-1-r, columns reversed), then the log-sigmoid
            # straight into the output
            u = d.mul_((rstd * gamma2[:, None, None])[..., None, None]).add_(beta2[:, None, None, None, None])
            u = u.flip(1, 2)
            dest = out[:, h - r1:h - r0, w - s1:w - s0].view(u.shape)
            torch.ops.aten.log_sigmoid_forward.output(u, output=dest, buffer=ls_buf[:u.numel()].view(u.shape))
        if save:
            ctx.save_for_backward(g, scale1, shift1, weight2, bias2, gamma2, beta2, z_all, mean_all, rstd_all)
            ctx.eps2, ctx.queries = eps2, queries
        return out.view(heads, n, n)

    @staticmethod
    def plain(
            g: torch.Tensor, scale1: torch.Tensor, shift1: torch.Tensor, weight2: torch.Tensor, bias2: torch.Tensor,
            gamma2: torch.Tensor, beta2: torch.Tensor, eps2: float,
    ) -> torch.Tensor:
        """``forward`` in plain autograd ops over all queries at once (its backward under ``create_graph=True``)."""
        c, h, w = scale1.shape
        kh, kw, heads, n = h + 2, w + 2, weight2.shape[0], h * w
        windows = g.unfold(1, kh, 1).unfold(2, kw, 1)  # (C, h, w, kh, kw)
        y = F.relu(windows * scale1[..., None, None] + shift1[..., None, None])
        z = F.conv2d(y.permute(1, 2, 0, 3, 4).reshape(n, c, kh, kw), weight2, bias2)
        u = F.group_norm(z, heads, gamma2, beta2, eps2)
        return F.logsigmoid(u).view(h, w, heads, n).flip(0, 1).permute(2, 0, 1, 3).reshape(heads, n, n)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        g, scale1, shift1, weight2, bias2, gamma2, beta2, z_all, mean_all, rstd_all = ctx.saved_tensors
        eps2, queries = ctx.eps2, ctx.queries
        need_g, need_scale, need_shift, need_w2, need_b2, need_gamma, need_beta = ctx.needs_input_grad[:7]
        if torch.is_grad_enabled():
            # autograd records this backward (create_graph=True): the gradients of the plain formula, differentiable
            inputs = (g, scale1, shift1, weight2, bias2, gamma2, beta2)
            return differentiable_grads(
                _PositionWindows.plain, inputs, ctx.needs_input_grad[:7], grad_out, eps2) + (None, None)
        need_y = need_g or need_scale or need_shift
        need_dz = need_y or need_w2 or need_b2
        c, h, w = scale1.shape
        kh, kw, heads, n = h + 2, w + 2, weight2.shape[0], h * w
        win = kh * kw
        dd = dict(dtype=g.dtype, device=g.device)
        grad_out = grad_out.reshape(heads, h, w, h, w)
        grad_g = torch.zeros_like(g) if need_g else None
        grad_scale = torch.empty_like(scale1) if need_scale else None
        grad_shift = torch.empty_like(shift1) if need_shift else None
        grad_taps = torch.zeros(9 * heads, c, **dd) if need_w2 else None
        grad_b2 = torch.zeros(heads, **dd) if need_b2 else None
        grad_gamma = torch.zeros_like(gamma2) if need_gamma else None
        grad_beta = torch.zeros_like(beta2) if need_beta else None
        taps = weight2.permute(2, 3, 0, 1).reshape(9 * heads, c)  # tap-major rows: (9H, C)
        offs = [di * kw + dj for di in range(3) for dj in range(3)]
        pad = offs[-1]
        windows = g.unfold(1, kh, 1).unfold(2, kw, 1)
        cap = min(queries, n) if queries < w else min(queries // w, h) * w
        # buffers for every chunk: conv2's output gradient on the flat layout (columns past a window's valid
        # outputs stay zero), left-padded so that its nine shifted copies are views; the copies; the recomputed
        # conv2 input, overwritten with its gradient
        dz_buf = torch.zeros(heads, pad + cap * win, **dd) if need_dz else None
        dz_taps = torch.empty(9 * heads, cap * win, **dd) if need_dz else None
        y_buf = torch.empty(c, cap * win, **dd) if need_y or need_w2 else None
        for r0, r1, s0, s1 in _chunks(h, w, queries):
            nr, ns = r1 - r0, s1 - s0
            cols = nr * ns * win
            z = z_all[:, r0:r1, s0:s1]
            mean, rstd = mean_all[:, r0:r1, s0:s1, None, None], rstd_all[:, r0:r1, s0:s1, None, None]
            xhat = (z - mean).mul_(rstd)
            u = xhat * gamma2[:, None, None, None, None] + beta2[:, None, None, None, None]
            # d logsigmoid(u) / du = sigmoid(-u)
            du = grad_out[:, h - r1:h - r0, w - s1:w - s0].flip(1, 2).mul_(torch.sigmoid(u.neg_()))
            if grad_gamma is not None:
                grad_gamma += (du * xhat).sum((1, 2, 3, 4))
            if grad_beta is not None:
                grad_beta += du.sum((1, 2, 3, 4))
            if not need_dz:
                continue
            # GroupNorm-2 (one head per group, over the h x w keys of a query): dz = rstd (dx - mean(dx) - xhat
            # mean(dx xhat)), dx = du gamma
            dx = du.mul_(gamma2[:, None, None, None, None])
            dz = dx.sub_(dx.mean((3, 4), keepdim=True)).sub_(xhat.mul_((dx * xhat).mean((3, 4), keepdim=True)))
            dz.mul_(rstd)
            if grad_b2 is not None:
                grad_b2 += dz.sum((1, 2, 3, 4))
            if not (need_y or need_w2):
                continue
            dz_flat = dz_buf[:, pad:pad + cols]
            dz_flat.view(heads, nr, ns, kh, kw)[..., :h, :w] = dz
            for t in range(9):  # tap t's copy: dz shifted right by its offset
                dz_taps[t * heads:(t + 1) * heads, :cols] = dz_buf[:, pad - offs[t]:pad - offs[t] + cols]
            y = y_buf[:, :cols].view(c, nr, ns, kh, kw)
            _pre_activation(windows, scale1, shift1, r0, r1, s0, s1, y)  # recomputed, not kept
            if grad_taps is not None:
                grad_taps.addmm_(dz_taps[:, :cols], y_buf[:, :cols].t())
            if not need_y:
                continue
            dy = torch.mm(taps.t(), dz_taps[:, :cols]).view(c, nr, ns, kh, kw)
            dpre = torch.ops.aten.threshold_backward.grad_input(dy, y, 0, grad_input=y)
            if grad_shift is not None:
                grad_shift[:, r0:r1, s0:s1] = dpre.sum((3, 4))
            if grad_scale is not None:
                grad_scale[:, r0:r1, s0:s1] = torch.mul(dpre, windows[:, r0:r1, s0:s1], out=dy).sum((3, 4))
            if grad_g is not None:
                dw = dpre.mul_(scale1[:, r0:r1, s0:s1, None, None])  # (C, R, S, kh, kw), the windows' gradient
                rows_in, cols_in = nr + kh - 1, ns + kw - 1
                dw = torch.ops.aten.unfold_backward(dw, [c, nr, cols_in, kh], 2, kw, 1)
                grad_g[:, r0:r0 + rows_in, s0:s0 + cols_in] += torch.ops.aten.unfold_backward(
                    dw, [c, rows_in, cols_in], 1, kh, 1)
        grad_w2 = None
        if grad_taps is not None:
            grad_w2 = grad_taps.view(3, 3, heads, c).permute(2, 3, 0, 1).contiguous()
        return grad_g, grad_scale, grad_shift, grad_w2, grad_b2, grad_gamma, grad_beta, None, None


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
            chunk_bytes: int = POS_CHUNK_BYTES,
    ) -> torch.Tensor:
        """Compute ``log(phi_p)`` (H, h*w, h*w) from the distances of the key-query offset grid, (2h+3, 2w+3).

        The same function as ``forward`` on every query's distance map, computed with its structure: the distance
        from a query to a key depends only on their offset, so conv1 (with the distance projection folded in) runs
        once on the offset grid and every query's (h+2)x(w+2) window of it is a slice; GroupNorm-1 (one channel per
        group) takes each window's statistics from integral images. Only ReLU, conv2, GroupNorm-2 and the
        log-sigmoid run per query, in ``_PositionWindows``. Gate: ``gates.use_offset_build``.
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
            g, scale1, shift1, self.conv2.weight, conv2_bias, self.norm2.weight, self.norm2.bias, self.norm2.eps,
            chunk_bytes)


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


class _BlockByBlock(Sequence):
    """The position attention of a grid too large for the cache, built one block at a time as the model uses it
    (peak memory: one block's worth, not the whole model's)."""

    def __init__(self, pos: 'PeripheralPosition', h: int, w: int, num_blocks: int):
        self._pos, self._h, self._w, self._n = pos, h, w, num_blocks

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._n))]
        if not -self._n <= index < self._n:
            raise IndexError(index)
        with torch.inference_mode(False), torch.no_grad():
            return self._pos.compute(self._h, self._w, blocks=[index % self._n])[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(self._n))


#: Position-module classes whose parameters and buffers are all their state (the cache can key on their values).
_KEYED_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.ModuleList)

try:  # what torch.ao.quantization.quantize_dynamic makes of the distance projection
    from torch.ao.nn.quantized.dynamic import Linear as _QUANTIZED_LINEAR
except ImportError:  # a torch build without quantization: no such module can appear
    _QUANTIZED_LINEAR = None


@register_notrace_module  # reason: caches on grid size and parameter values (Python control flow)
class PeripheralPosition(nn.Module):
    """Peripheral position encoding: ``log(phi_p)`` of every block, shape (H, N, N) each, for an h x w token grid.

    Position grid: token centres sit on normalized coordinates ``linspace(-1, 1, n)`` per axis (n = h or w), and the
    key grid is extended by two positions on each side with the same spacing, so the valid 3x3 convs of each block's
    ``PositionConvNet`` bring it back to h x w. Because coordinates are normalized, the peripheral regions are relative
    to the image: at 448 px a head covers the same fraction of the image as at 224 px (on a finer grid), and for a
    non-square input each axis is normalized on its own. At 224 px (14 x 14 tokens) this is the official encoding.

    Cache (gate ``gates.use_position_cache``): whenever autograd will not want gradients of the position parameters
    (``no_grad``, ``inference_mode``, or the parameters frozen), whatever the module mode, the result is cached per
    grid and reused. An entry is used only when the values of the position parameters and buffers (and of every
    parametrized weight) equal, exactly, those it was computed from, and the grid, device, dtype and autocast state
    match; so an optimizer step, ``load_state_dict``, ``.to()``, an edit through ``.data``, a new pruning mask or a
    parametrization's state change all trigger a recompute. Position modules of other types than the stock layers
    (quantized, subclassed) or with hooks other than pruning masks and ``weight_norm`` are recomputed on every call,
    so their state and hooks are honoured. The cache keeps at most ``cache_size`` grids and ``cache_bytes`` bytes,
    evicting the least recently used grid (0 for either disables it). A grid whose position attention does not fit
    ``cache_bytes`` is built one block at a time as the blocks use it (logged once). One model may serve many threads:
    a lock guards the cache's bookkeeping, never the computation; a forked child starts with a lock and cache of its
    own. The cache is never saved in the state dict, nor pickled or deep-copied.

    Under ``torch.compile`` the lookup runs outside the graph (one graph break; the graph takes the cached tensors as
    inputs, so a hit neither rebuilds nor recompiles). With ``fullgraph=True`` no break is possible: the compiled
    graph then recomputes the position attention on every call.

    One block's position attention takes heads x (h*w)^2 values; above ``max_block_bytes`` a ``PositionMemoryError``
    names the grid, the bytes and the setting before anything is allocated.
    """
    __jit_ignored_attributes__ = [
        '_cache', '_cache_lock', '_lock_pid', '_warned_cache_bytes', '_state_plan', '_counts']
    __jit_unused_properties__ = ['cache_lock']

    def __init__(
            self,
            num_heads: int,
            depth: int,
            eps: float = 1e-5,
            cache_size: int = 4,
            cache_bytes: int = POS_CACHE_BYTES,
            max_block_bytes: int = POS_MAX_BLOCK_BYTES,
            fast_paths: bool = True,
            chunk_bytes: int = POS_CHUNK_BYTES,
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
            max_block_bytes: Most bytes one block's position attention may take (larger inputs are refused).
            fast_paths: Take the gated fast paths (False: the plain path everywhere).
            chunk_bytes: Working-set bytes of one chunk of queries in the offset-grid build (speed only: every value
                gives the same result).
            device: Device of the parameters.
            dtype: Dtype of the parameters.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.num_heads = num_heads
        self.key_pad = KEY_PAD
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.max_block_bytes = max_block_bytes
        self.fast_paths = fast_paths
        self.chunk_bytes = chunk_bytes
        self.dist_proj = nn.Linear(1, 4 * num_heads, **dd)
        self.blocks = nn.ModuleList([PositionConvNet(num_heads, eps=eps, **dd) for _ in range(depth)])
        self._cache: 'OrderedDict[Tuple[Any, ...], _CacheEntry]' = OrderedDict()
        self._cache_lock = threading.Lock()
        self._lock_pid = os.getpid()
        self._warned_cache_bytes = False
        self._state_plan: Optional[Tuple[Tuple[Any, ...], List[List[int]]]] = None
        self._counts = dict(hits=0, misses=0, builds=0)

    def __getstate__(self) -> Dict[str, Any]:
        # a lock can be neither pickled nor deep-copied; the copy starts with an empty cache of its own
        state = super().__getstate__()
        state.pop('_cache_lock', None)
        state['_cache'] = OrderedDict()
        state['_state_plan'] = None
        state['_counts'] = dict(hits=0, misses=0, builds=0)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._cache_lock = threading.Lock()
        self._lock_pid = os.getpid()
        for name, value in (('_cache', OrderedDict()), ('cache_bytes', POS_CACHE_BYTES), ('_warned_cache_bytes', False),
                            ('_state_plan', None), ('max_block_bytes', POS_MAX_BLOCK_BYTES), ('fast_paths', True),
                            ('chunk_bytes', POS_CHUNK_BYTES), ('_counts', dict(hits=0, misses=0, builds=0))):
            self.__dict__.setdefault(name, value)

    def _lock(self) -> threading.Lock:
        """The cache lock of this process. A forked child (DataLoader workers, multiprocessing) may inherit the lock
        held by a parent thread that does not exist in the child: it gets a new lock and an empty cache."""
        if self._lock_pid != os.getpid():
            self._cache_lock = threading.Lock()
            self._cache = OrderedDict()
            self._lock_pid = os.getpid()
        return self._cache_lock

    @property
    def cache_lock(self) -> threading.Lock:
        """The lock of the cache's bookkeeping in this process (hold it to make several cache calls atomic)."""
        return self._lock()

    @torch.jit.unused
    def _count(self, name: str, n: int = 1) -> None:
        """Add to a ``cache_info`` counter; eager calls only (a traced or exported graph has no such side effect)."""
        if not is_compiling() and not is_exporting():
            with self._lock():
                self._counts[name] += n

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

    def _factory(self) -> Tuple[torch.device, torch.dtype]:
        """Device and dtype of the position attention: those of the first floating-point position parameter (a
        quantized distance projection holds no float ``weight``)."""
        if torch.jit.is_scripting():
            weight = self.dist_proj.weight
            return weight.device, weight.dtype
        return self._first_float_parameter()

    @torch.jit.unused
    def _first_float_parameter(self) -> Tuple[torch.device, torch.dtype]:
        for t in self.parameters():
            if t.is_floating_point():
                return t.device, t.dtype
        return torch.device('cpu'), torch.get_default_dtype()

    def distances(self, h: int, w: int) -> torch.Tensor:
        """Distance from every query (inner h x w grid) to every key of the grid extended by ``key_pad``:
        ``token_distances`` on the device and in the dtype of the parameters, (h*w, 1, h+4, w+4)."""
        device, dtype = self._factory()
        return token_distances(h, w, self.key_pad, device=device, dtype=dtype).unsqueeze(1)

    def offset_distances(self, h: int, w: int) -> torch.Tensor:
        """Distance of every key-query offset, (2h+3, 2w+3): entry (h+1+i, w+1+j) for i rows and j columns apart.

        The query-to-key distances of ``distances`` depend only on the offset (the grid is evenly spaced), so every
        query's (h+4)x(w+4) distance map is a window of this grid.
        """
        device, dtype = self._factory()
        p = self.key_pad
        dy = _grid_offsets(h, torch.arange(-(h - 1 + p), h + p, device=device, dtype=dtype))
        dx = _grid_offsets(w, torch.arange(-(w - 1 + p), w + p, device=device, dtype=dtype))
        return _distance(dy[:, None], dx[None, :])

    def project(self, dist: torch.Tensor) -> torch.Tensor:
        """The shared distance projection as a module on a distance map: (Nq, 1, hk, wk) -> (Nq, 4H, hk, wk)."""
        return self.dist_proj(dist.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    @torch.jit.unused
    def block_bytes(self, h: int, w: int) -> int:
        """Bytes of one block's position attention for an h x w token grid: heads x (h*w)^2 values."""
        return self.num_heads * (h * w) ** 2 * torch.empty((), dtype=self._factory()[1]).element_size()

    @torch.jit.unused
    def _check_block_bytes(self, h: int, w: int) -> None:
        nbytes = self.block_bytes(h, w)
        if nbytes > self.max_block_bytes:
            raise PositionMemoryError(
                f'PerViT: the position attention of one block for a {h}x{w} token grid (about {16 * h}x{16 * w} px '
                f'input) takes {nbytes / 2 ** 30:.1f} GiB ({self.num_heads} heads x {h * w}^2 values), more than '
                f'pos_max_block_bytes={self.max_block_bytes} ({self.max_block_bytes / 2 ** 30:.1f} GiB). Resize the '
                f'input, or create the model with a larger bound: timm.create_model(..., pos_max_block_bytes=N) '
                f'(or set model.pos_attn.max_block_bytes).')

    def compute(self, h: int, w: int, num_blocks: Optional[int] = None,
                blocks: Optional[List[int]] = None) -> List[torch.Tensor]:
        """Compute ``log(phi_p)`` for the first ``num_blocks`` blocks (all by default), or for the block indices in
        ``blocks``, without caching."""
        num_blocks = len(self.blocks) if num_blocks is None else num_blocks
        indices = [i for i in range(num_blocks)] if blocks is None else blocks
        if not torch.jit.is_scripting():
            if not is_exporting() and not is_compiling():
                self._check_block_bytes(h, w)
            self._count('builds', len(indices))
            if gates.use_offset_build(self, max(indices) + 1 if indices else 0):
                offsets = self.offset_distances(h, w)
                weight, bias = self.dist_proj.weight, self.dist_proj.bias
                return [self.blocks[i].forward_offsets(offsets, h, w, weight, bias, self.chunk_bytes) for i in indices]
        dist = self.distances(h, w)
        feats: Optional[torch.Tensor] = None
        n = h * w
        out: List[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            if i in indices:  # no `break`: TorchScript unrolls ModuleList loops
                if torch.jit.is_scripting() or self._folds(i):
                    y = blk(dist, self.dist_proj.weight, self.dist_proj.bias)
                else:
                    if feats is None:
                        feats = self.project(dist)
                    y = blk(feats)
                # (N, H, h, w): query, head, key grid
                out.append(y.reshape(n, self.num_heads, n).transpose(0, 1))
        return out

    @torch.jit.unused
    def _folds(self, index: int) -> bool:
        return gates.use_folded_projection(self, self.blocks[index])

    @torch.jit.unused
    def _state(self) -> Optional[Tuple[Tuple[int, ...], List[torch.Tensor]]]:
        """What the position attention is a function of: the identity of the position modules and their values.

        The values are every parameter and buffer of the position modules, plus the computed value of every
        parametrized tensor (a parametrization may keep state in plain attributes). None when the result depends on
        more than that (a module of another type than the stock layers and the dynamic int8 Linear, whose packed
        weight and bias are read back as values; a hook other than pruning or weight norm) or when there are no values
        (meta device).
        """
        modules: List[int] = []
        tensors: List[torch.Tensor] = []
        # a plain walk over the submodules: this runs on every cached call, and named_modules() builds name strings.
        # Modules inside a parametrization are keyed through the parametrized tensor's computed value.
        stack: List[Tuple[nn.Module, bool]] = [(m, False) for m in self._modules.values()]
        while stack:
            m, inside_parametrization = stack.pop()
            if gates.has_opaque_hooks(m):
                return None
            parametrized = isinstance(m._modules.get('parametrizations'), nn.ModuleDict)
            if not inside_parametrization and type(m) is _QUANTIZED_LINEAR:
                # dynamic int8 (quantize_dynamic): its state is the packed weight and bias, read back as values
                modules.append(id(m))
                bias = m.bias()
                tensors += [m.weight().dequantize()] + ([bias] if bias is not None else [])
                continue
            if not inside_parametrization and not (
                    type(m) is PositionConvNet or gates.base_type(m) in _KEYED_TYPES):
                return None
            modules.append(id(m))  # a replaced module (another padding, say) holding equal values is a change too
            tensors += [t for t in m._parameters.values() if t is not None]
            tensors += [t for t in m._buffers.values() if t is not None]
            if parametrized:
                with torch.no_grad():
                    tensors += [getattr(m, name) for name in m.parametrizations]
            for name, child in m._modules.items():
                if child is not None:
                    stack.append((child, inside_parametrization or (parametrized and name == 'parametrizations')))
        if not tensors or tensors[0].device.type == 'meta':
            return None
        # One concatenation per dtype and device rather than one comparison per tensor (on CUDA each torch.equal
        # synchronizes); the grouping only changes with the layout, so it is reused
        layout = tuple((t.dtype, t.device) for t in tensors)
        plan = self._state_plan
        if plan is None or plan[0] != layout:
            groups: Dict[Tuple[Any, ...], List[int]] = {}
            for i, t in enumerate(tensors):
                groups.setdefault((t.dtype, t.device), []).append(i)
            plan = self._state_plan = (layout, list(groups.values()))
        with torch.no_grad():
            return tuple(modules), [torch.cat([tensors[i].reshape(-1) for i in idx]) for idx in plan[1]]

    @torch.jit.unused
    def _cached(self, h: int, w: int, num_blocks: int, lazy: bool) -> Sequence[torch.Tensor]:
        """The position attention through the cache, where ``gates.use_position_cache`` holds (the caller checks);
        ``lazy``: a grid that does not fit is built block by block."""
        state = self._state()
        if state is None:
            return self.compute(h, w, num_blocks)
        modules, values = state
        device, dtype = values[0].device, values[0].dtype
        key = (h, w, device, dtype, autocast_dtype(device.type))
        lock = self._lock()
        with lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
        if entry is not None and entry.computed_from(modules, values):
            self._count('hits')
            return entry.tensors[:num_blocks]
        self._count('misses')

        self._check_block_bytes(h, w)
        nbytes = len(self.blocks) * self.block_bytes(h, w) + sum(v.numel() * v.element_size() for v in values)
        if nbytes > self.cache_bytes:
            if not self._warned_cache_bytes:
                self._warned_cache_bytes = True
                _logger.warning(
                    f'The position attention of a {h}x{w} token grid takes {nbytes / 2 ** 20:.0f} MiB, more than the '
                    f'cache bound of {self.cache_bytes / 2 ** 20:.0f} MiB: it is not kept, and each call builds it '
                    f'again{", one block at a time" if lazy else ""}. Create the model with pos_cache_bytes >= '
                    f'{nbytes} (or set model.pos_attn.cache_bytes) to keep it.')
            if lazy:
                return _BlockByBlock(self, h, w, num_blocks)
            with torch.inference_mode(False), torch.no_grad():
                return self.compute(h, w, num_blocks)

        # a miss: compute outside the lock (other threads go on; if two compute the same grid, the last one stays).
        # Plain tensors even under inference_mode, so one entry also serves no_grad and frozen-parameter autograd.
        # `values` were made by torch.cat: a copy, which later in-place edits of the parameters leave alone
        with torch.inference_mode(False), torch.no_grad():
            tensors = [t.contiguous() for t in self.compute(h, w)]
        with lock:
            entries = list(self._cache.items())
        stale = [(k, e) for k, e in entries if not e.computed_from(modules, values)]
        with lock:
            for k, e in stale:  # computed from other modules or values: never usable again
                if self._cache.get(k) is e:
                    del self._cache[k]
            self._cache[key] = _CacheEntry(modules, values, tensors, nbytes)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size or self._cached_bytes() > self.cache_bytes:
                self._cache.popitem(last=False)  # least recently used first
        return tensors[:num_blocks]

    @torch.jit.unused
    @_compiler_disable
    def _cached_outside_graph(self, h: int, w: int, num_blocks: int) -> List[torch.Tensor]:
        """``_cached`` run eagerly from a compiled model: a graph break, and the graph takes the tensors as inputs.

        The gate is decided again here, eagerly: while dynamo traced, no transform could be seen."""
        if not gates.use_position_cache(self):
            return self.compute(h, w, num_blocks)
        return list(self._cached(h, w, num_blocks, lazy=False))

    def _cached_bytes(self) -> int:
        return sum(e.nbytes for e in self._cache.values())

    @torch.jit.unused
    def cache_info(self) -> Dict[str, Any]:
        """The inference cache: entries and bytes held, its bounds, the grids held (least recently used first) and
        counters since creation or the last ``clear_cache()``.

        Returns:
            ``entries``, ``bytes``, ``max_entries``, ``max_bytes``; ``grids``: one ``(h, w, dtype, autocast dtype or
            None)`` per entry; ``hits`` and ``misses``: cache lookups answered from an entry or not (a miss computes,
            or builds block by block when the grid does not fit); ``builds``: blocks whose position attention was
            computed, by any path, in eager calls.
        """
        with self._lock():
            return dict(
                entries=len(self._cache), bytes=self._cached_bytes(), max_entries=self.cache_size,
                max_bytes=self.cache_bytes, grids=[(k[0], k[1], k[3], k[4]) for k in self._cache], **self._counts)

    @torch.jit.unused
    def clear_cache(self) -> None:
        """Drop all cached position attention (it is rebuilt on demand) and reset the ``cache_info`` counters."""
        with self._lock():
            self._cache.clear()
            self._counts = dict(hits=0, misses=0, builds=0)

    def forward(self, h: int, w: int, num_blocks: Optional[int] = None) -> List[torch.Tensor]:
        """Return ``log(phi_p)`` of the first ``num_blocks`` blocks for an h x w token grid, each (H, h*w, h*w).

        The result is a sequence indexed by block; for a grid that does not fit the cache it builds each block when
        indexed.
        """
        if torch.jit.is_scripting():
            return self.compute(h, w, num_blocks)
        if is_exporting() and not self.training:
            # as in eager inference (built under no_grad for the cache), a constant; a mask requiring grad would also
            # send SDPA to another kernel in torch.onnx's decompositions than in the trace, breaking the traced reshapes
            return [t.detach() for t in self.compute(h, w, num_blocks)]
        num_blocks = len(self.blocks) if num_blocks is None else num_blocks
        if not gates.use_position_cache(self):
            return self.compute(h, w, num_blocks)
        if is_compiling():
            # torch.compile: the lookup runs outside the graph (a graph break), so a compiled model reuses the cache
            # like an eager one; under fullgraph=True no break is possible and the graph recomputes it every call
            if _graph_breaks_allowed():
                return self._cached_outside_graph(h, w, num_blocks)
            return self.compute(h, w, num_blocks)
        return self._cached(h, w, num_blocks, lazy=True)  # type: ignore[return-value]
