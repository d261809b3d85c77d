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
    pass, a few samples or a block of query rows at a time (so its intermediates stay cache-sized at any input size),
    and writes the gradients of q, k and v straight into one packed gradient, the qkv Linear's output gradient
    (unpacking q, k, v with autograd would stack and permute three gradients back into that layout), and returns the
    mask's (summed over the batch).
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
            # chunks of about chunk_bytes of attention: several whole samples, or row blocks of one sample, so the
            # (rows, N) slices of the attention and its gradient stay in cache at every input size (the key and value
            # gradients are summed over a sample's row blocks)
            row_bytes = H * N * torch.finfo(ct).bits // 8
            step = min(B, max(1, PeripheralSdpaCpu.chunk_bytes // (row_bytes * N)))
            rows = N if step > 1 else min(N, max(1, PeripheralSdpaCpu.chunk_bytes // row_bytes))
            dd = dict(dtype=ct, device=qkv.device)
            # per-chunk operands, copied once into contiguous (b * H, rows, D) buffers: the batched matmuls would
            # copy strided slices on every call
            qs, do, gq = (torch.empty(step * H, rows, D, **dd) for _ in range(3))
            kc, vc, gk, gv = (torch.empty(step * H, N, D, **dd) for _ in range(4))
            for b0 in range(0, B, step):
                b = slice(b0, b0 + step)
                n = min(step, B - b0) * H
                qkv_b = qkv[b].permute(2, 0, 3, 1, 4)  # (3, b, H, N, D) view
                kc[:n].view(-1, H, N, D).copy_(qkv_b[1])
                vc[:n].view(-1, H, N, D).copy_(qkv_b[2])
                for r0 in range(0, N, rows):
                    r = slice(r0, r0 + rows)
                    m = min(rows, N - r0)
                    q_r, do_r = qs[:n, :m], do[:n, :m]
                    q_r.view(-1, H, m, D).copy_(qkv_b[0][:, :, r]).mul_(scale)
                    do_r.view(-1, H, m, D).copy_(grad_out[b, :, r])
                    # the softmax of these rows, rebuilt from the saved log-sum-exp
                    attn = torch.bmm(q_r, kc[:n].transpose(1, 2)).view(-1, H, m, N)
                    attn = attn.add_(mask_c[:, :, r]).sub_(lse[b, :, r]).exp_().view(n, m, N)
                    # dS = P * (dO v^T - rowsum(dO * O)), in place on dO v^T
                    grad_s = torch.bmm(do_r, vc[:n].transpose(1, 2)).view(-1, H, m, N).sub_(delta[b, :, r])
                    grad_s = grad_s.view(n, m, N).mul_(attn)
                    if grad_mask is not None:
                        grad_mask[:, :, r].add_(grad_s.view(-1, H, m, N).sum_to_size(1, H, m, N))
                    if grad_qkv is not None:
                        beta = 0. if r0 == 0 else 1.  # the first row block writes, the others add
                        gv[:n].baddbmm_(attn.transpose(1, 2), do_r, beta=beta)
                        gk[:n].baddbmm_(grad_s.transpose(1, 2), q_r, beta=beta)
                        torch.bmm(grad_s, kc[:n], out=gq[:n, :m]).mul_(scale)
                        grad_qkv[b, r, 0].copy_(gq[:n, :m].view(-1, H, m, D).transpose(1, 2))
                    del attn, grad_s
                if grad_qkv is not None:
                    grad_b = grad_qkv[b].permute(2, 0, 3, 1, 4)
                    grad_b[1].copy_(gk[:n].view(-1, H, N, D))
                    grad_b[2].copy_(gv[:n].view(-1, H, N, D))
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
