"""The fused peripheral attention kernel: ``softmax(q k^T * scale + mask) v`` with a mask that may need a gradient.

``peripheral_sdpa`` is the one entry point ``PeripheralAttention`` calls. It runs ``F.scaled_dot_product_attention``
unless the additive mask (the log position attention) needs a gradient off CUDA: there SDPA would fall back to its
math kernel and keep every block's (B, H, N, N) attention for backward. Then it uses, on CPU, ``PeripheralSdpaCpu``
(the CPU flash kernel forward plus a one-pass backward that also returns the mask's gradient), and elsewhere
(compiling, exporting, other devices, torch builds without the CPU flash op) SDPA under non-re-entrant activation
checkpointing, which recomputes the attention in backward instead of keeping it.
"""
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from ._compat import checkpoint, is_compiling, is_exporting, is_fx_tracing

__all__ = ['peripheral_sdpa', 'PeripheralSdpaCpu']

class PeripheralSdpaCpu(torch.autograd.Function):
    """``softmax(q k^T * scale + mask) v`` on CPU with a gradient for the mask and O(N) saved activations.

    The forward is the CPU flash kernel, which also returns the row log-sum-exp; the backward rebuilds the attention
    from it in one pass, a few samples at a time (so its B x H x N x N intermediates stay cache-sized), and returns
    the gradients of q, k, v and the mask (the mask's summed over the batch). Without it, SDPA would fall to its math
    kernel whenever the mask needs a gradient and keep every block's attention for backward.
    """

    #: Bytes of one chunk's attention matrix in backward (the chunk is at least one sample).
    chunk_bytes: int = 1 << 21

    @staticmethod
    def forward(
            ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
    ) -> torch.Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        q, k, v, mask, out, lse = ctx.saved_tensors
        scale = ctx.scale
        need_q, need_k, _, need_mask, _ = ctx.needs_input_grad
        B, H, N, _ = q.shape
        # low-precision inputs are promoted: the softmax and its gradient are computed in float32 (or float64), also
        # when backward is called under autocast
        ct = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            # contiguous operands: the batched matmuls below would otherwise copy every chunk's slices
            qs = q.to(ct) * scale
            kc, vc, do = (t.to(ct).contiguous() for t in (k, v, grad_out))
            lse, mask_c = lse.to(ct).unsqueeze(-1), mask.to(ct)
            delta = (do * out.to(ct)).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
            grad_q, grad_k, grad_v = torch.empty_like(qs), torch.empty_like(kc), torch.empty_like(vc)
            grad_mask = torch.zeros(mask.shape, dtype=ct, device=mask.device) if need_mask else None
            step = max(1, PeripheralSdpaCpu.chunk_bytes // (H * N * N * torch.finfo(ct).bits // 8))
            for b0 in range(0, B, step):
                b = slice(b0, b0 + step)
                # the softmax, rebuilt from the saved log-sum-exp
                attn = torch.matmul(qs[b], kc[b].transpose(-2, -1)).add_(mask_c).sub_(lse[b]).exp_()
                torch.matmul(attn.transpose(-2, -1), do[b], out=grad_v[b])
                # dS = P * (dO v^T - rowsum(dO * O)), in place on dO v^T
                grad_s = torch.matmul(do[b], vc[b].transpose(-2, -1)).sub_(delta[b]).mul_(attn)
                del attn
                if grad_mask is not None:
                    grad_mask.add_(grad_s.sum_to_size(mask.shape))
                if need_q:
                    torch.matmul(grad_s, kc[b], out=grad_q[b])
                if need_k:
                    torch.matmul(grad_s.transpose(-2, -1), qs[b], out=grad_k[b])
        return (
            grad_q.mul_(scale).to(q.dtype) if need_q else None,
            grad_k.to(k.dtype) if need_k else None,
            grad_v.to(v.dtype),
            grad_mask.to(mask.dtype) if grad_mask is not None else None,
            None,
        )


def _cpu_kernel_supports(q: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``PeripheralSdpaCpu`` can take this call (eager CPU, a dtype and mask layout of the CPU flash op)."""
    return _HAS_CPU_FLASH and q.device.type == 'cpu' and q.dtype == mask.dtype \
        and mask.dim() == 4 and mask.shape[0] == 1 \
        and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


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


def peripheral_sdpa(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` for q, k, v (B, H, N, D) and an additive mask (1, H, N, N).

    Gradients reach q, k, v and the mask (when it requires grad) on every path; see the module docstring.
    """
    # meta tensors hold no memory to save, and torch 2.1's checkpoint cannot run on them (no torch.meta module)
    if is_fx_tracing() or not (mask.requires_grad and torch.is_grad_enabled()) or mask.device.type in ('cuda', 'meta'):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if not (is_compiling() or is_exporting()) and _cpu_kernel_supports(q, mask):
        return PeripheralSdpaCpu.apply(q, k, v, mask, scale)
    return checkpoint(F.scaled_dot_product_attention, q, k, v, mask, scale=scale)
