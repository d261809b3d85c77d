"""The fused peripheral attention kernel: ``softmax(q k^T * scale + mask) v`` with a mask that may need a gradient.

``peripheral_sdpa`` is the one entry point ``PeripheralAttention`` calls; ``gates.attention_path`` picks its kernel.
Where the additive mask (the log position attention) needs a gradient off CUDA, SDPA would fall back to its math
kernel and keep every block's (B, H, N, N) attention for backward. Then it uses, on CPU, ``PeripheralSdpaCpu`` (the
CPU flash kernel forward plus a one-pass backward that also returns the mask's gradient), and elsewhere (compiling,
exporting, torch builds without the CPU flash op) SDPA under non-re-entrant activation checkpointing. Under
``torch.func`` transforms and forward-mode AD the explicit softmax formula runs.
"""
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from timm.models import register_notrace_function

from .._compat import checkpoint
from .gates import attention_path

__all__ = ['peripheral_sdpa', 'PeripheralSdpaCpu', 'math_attention', 'unpacked_sdpa', 'cpu_kernel_supports', 'differentiable_grads']


class PeripheralSdpaCpu(torch.autograd.Function):
    """``softmax(q k^T * scale + mask) v`` on CPU with a gradient for the mask and O(N) saved activations.

    Takes the attention's packed projection ``qkv`` (B, N, 3, H, D), as the qkv Linear returns it. The forward is the
    CPU flash kernel, which also returns the row log-sum-exp; the backward rebuilds the attention from it in one
    pass, a few samples at a time (so its B x H x N x N intermediates stay cache-sized), and writes the gradients of
    q, k and v straight into one packed gradient, the qkv Linear's output gradient (unpacking q, k, v with autograd
    would stack and permute three gradients back into that layout), and returns the mask's (summed over the batch).
    Without it, SDPA would fall to its math kernel whenever the mask needs a gradient and keep every block's attention
    for backward.
    """

    #: Bytes of one chunk's attention matrix in backward (the chunk is at least one sample).
    chunk_bytes: int = 1 << 21

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        ctx.save_for_backward(qkv, mask, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        qkv, mask, out, lse = ctx.saved_tensors
        scale = ctx.scale
        need_qkv, need_mask, _ = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # autograd records this backward (create_graph=True: gradient penalties, second-order methods): the
            # gradients of the explicit formula, themselves differentiable
            return differentiable_grads(math_attention, (qkv, mask), (need_qkv, need_mask), grad_out, scale) + (None,)
        B, N, _, H, D = qkv.shape
        # low-precision inputs are promoted: the softmax and its gradient are computed in float32 (or float64), also
        # when backward is called under autocast
        ct = torch.promote_types(qkv.dtype, torch.float32)
        with torch.autocast(qkv.device.type, enabled=False):
            lse, mask_c = lse.to(ct).unsqueeze(-1), mask.to(ct)
            delta = (grad_out.to(ct) * out.to(ct)).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
            grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device) if need_qkv else None
            grad_mask = torch.zeros(mask.shape, dtype=ct, device=mask.device) if need_mask else None
            step = min(B, max(1, PeripheralSdpaCpu.chunk_bytes // (H * N * N * torch.finfo(ct).bits // 8)))
            # per-chunk operands, copied once into contiguous (b * H, N, D) buffers: the batched matmuls would copy
            # strided slices on every call
            qs, kc, vc, do, gq, gk, gv = (torch.empty(step * H, N, D, dtype=ct, device=qkv.device) for _ in range(7))
            for b0 in range(0, B, step):
                b = slice(b0, b0 + step)
                n = min(step, B - b0) * H
                qkv_b = qkv[b].permute(2, 0, 3, 1, 4)  # (3, b, H, N, D) view
                for buf, src in ((qs, qkv_b[0]), (kc, qkv_b[1]), (vc, qkv_b[2]), (do, grad_out[b])):
                    buf[:n].view(-1, H, N, D).copy_(src)
                qs[:n].mul_(scale)
                # the softmax, rebuilt from the saved log-sum-exp
                attn = torch.bmm(qs[:n], kc[:n].transpose(1, 2)).view(-1, H, N, N)
                attn = attn.add_(mask_c).sub_(lse[b]).exp_().view(n, N, N)
                # dS = P * (dO v^T - rowsum(dO * O)), in place on dO v^T
                grad_s = torch.bmm(do[:n], vc[:n].transpose(1, 2)).view(-1, H, N, N).sub_(delta[b])
                grad_s = grad_s.view(n, N, N).mul_(attn)
                if grad_mask is not None:
                    grad_mask.add_(grad_s.view(-1, H, N, N).sum_to_size(mask.shape))
                if grad_qkv is not None:
                    torch.bmm(attn.transpose(1, 2), do[:n], out=gv[:n])
                    torch.bmm(grad_s, kc[:n], out=gq[:n]).mul_(scale)
                    torch.bmm(grad_s.transpose(1, 2), qs[:n], out=gk[:n])
                    grad_b = grad_qkv[b].permute(2, 0, 3, 1, 4)
                    for i, buf in enumerate((gq, gk, gv)):
                        grad_b[i].copy_(buf[:n].view(-1, H, N, D))
                del attn, grad_s
        return grad_qkv, grad_mask.to(mask.dtype) if grad_mask is not None else None, None


def differentiable_grads(
        fn: Any, inputs: Tuple[torch.Tensor, ...], needs: Tuple[bool, ...], grad_out: torch.Tensor, *args: Any,
) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of ``fn(*inputs, *args)`` for the inputs in ``needs``, recorded by autograd (a custom Function's
    backward under ``create_graph=True``): the saved inputs carry their history, so the result is differentiable.

    ``fn`` runs on an alias of each input, and the gradients are taken at the aliases: an input that is an ancestor of
    another (the position build takes a grid and statistics computed from it) then gets only its own partial
    derivative, as autograd expects from a Function's backward, not the total one counted again upstream."""
    with torch.enable_grad():
        inputs = tuple(t.view_as(t) for t in inputs)
        out = fn(*inputs, *args)
    wanted = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True) if wanted else ())
    return tuple(next(grads) if need else None for need in needs)


def cpu_kernel_supports(qkv: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``PeripheralSdpaCpu`` can take this call (eager CPU, a dtype and mask layout of the CPU flash op)."""
    return _HAS_CPU_FLASH and qkv.device.type == 'cpu' and qkv.dtype == mask.dtype \
        and qkv.dim() == 5 and mask.dim() == 4 and mask.shape[0] == 1 \
        and qkv.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cpu_flash_takes_mask() -> bool:
    """The CPU flash op exists and accepts an additive mask (torch >= 2.3)."""
    op = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)
    if op is None:
        return False
    try:
        q = torch.zeros(1, 1, 2, 8)
        op(q, q, q, 0.0, False, attn_mask=torch.zeros(1, 1, 2, 2), scale=1.)
        return True
    except (RuntimeError, TypeError):
        return False


_HAS_CPU_FLASH = _cpu_flash_takes_mask()


@register_notrace_function  # one FX node: a traced model picks its kernel when it runs, as the eager one does
def peripheral_sdpa(qkv: torch.Tensor, mask: torch.Tensor, scale: float, fast: bool = True) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` for the packed projection ``qkv`` (B, N, 3, H, D) and an additive mask
    (1, H, N, N); returns (B, H, N, D).

    Gradients reach qkv and the mask (when it requires grad) on every path, also second-order ones; ``fast=False``
    takes the plain path (SDPA as such). See the module docstring and ``gates.attention_path``.
    """
    if torch.jit.is_scripting():
        return unpacked_sdpa(qkv, mask, scale)
    return _dispatch(qkv, mask, scale, fast)


@torch.jit.unused
def _dispatch(qkv: torch.Tensor, mask: torch.Tensor, scale: float, fast: bool) -> torch.Tensor:
    path = attention_path(qkv, mask, fast)
    if path == 'math':
        return math_attention(qkv, mask, scale)
    if path == 'cpu_kernel':
        return PeripheralSdpaCpu.apply(qkv, mask, scale)
    if path == 'checkpointed_sdpa':
        return checkpoint(unpacked_sdpa, qkv, mask, scale)
    return unpacked_sdpa(qkv, mask, scale)


def math_attention(qkv: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The explicit ``softmax(q k^T * scale + mask) v``: plain autograd ops, every transform and derivative order."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * scale + mask, dim=-1)
    return attn @ v


def unpacked_sdpa(qkv: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on q, k, v unpacked (views) from ``qkv`` (B, N, 3, H, D)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
