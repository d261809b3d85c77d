"""timm_pervit.tools.flops: count_gmacs counts the fused attention kernel like the explicit attention's matmuls."""
import pytest
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from timm_pervit.tools.flops import count_gmacs
from timm_pervit.tools.flops import flop_counter_mode

from tests.conftest import make_micro


def test_gmacs_count_the_attention_matmuls():
    """count_gmacs counts the fused attention kernel as the explicit attention's two matmuls, per image."""
    model = make_micro().eval()
    input_size, batch = (3, 64, 80), 2
    seen = []
    for blk in model.blocks:
        blk.attn.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    fused = count_gmacs(model, input_size, batch_size=batch)
    # q k^T and attn v: N x N x C multiply-accumulates each per image, for the (B, N, C) tokens every block attended
    attn_macs = sum(2 * n * n * c for _, n, c in seen[-len(model.blocks):]) / 1e9
    x = torch.randn(batch, *input_size)
    with torch.no_grad():
        with flop_counter_mode() as ours:
            model(x)
        with FlopCounterMode(display=False) as plain:  # torch's own formulas only
            model(x)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    explicit = count_gmacs(model, input_size, batch_size=batch)
    with torch.no_grad(), FlopCounterMode(display=False) as plain_explicit:
        model(x)

    def per_image_gmacs(flops):
        return flops / 2 / batch / 1e9

    # the token-shape formula is what torch counts for the explicit attention's batched matmuls, and count_gmacs
    # reports torch's count per image
    assert per_image_gmacs(plain_explicit.get_flop_counts()['Global'][torch.ops.aten.bmm]) == pytest.approx(attn_macs)
    assert explicit == pytest.approx(per_image_gmacs(plain_explicit.get_total_flops()), rel=1e-9)
    assert fused == pytest.approx(explicit, rel=1e-9)
    # a plain FlopCounterMode misses the CPU flash kernel where torch has no formula for it (flops.py's reason)
    kernel = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)
    dispatched = kernel is not None and kernel in ours.get_flop_counts()['Global']
    missed = attn_macs if dispatched and kernel not in getattr(flop_counter, 'flop_registry', {}) else 0.
    assert per_image_gmacs(plain.get_total_flops()) == pytest.approx(fused - missed, rel=1e-9)


def test_the_position_build_is_counted_with_every_gemm():
    """The offset-grid build runs conv2 as one GEMM and eight in-place accumulating ones per chunk, and its backward
    two more (weight and input gradients): flop_counter_mode counts them all, so what the benchmark reports as the
    build's FLOPs is at least conv2's work on the valid outputs, 2 x 9 x 4H x H x N x N per block, and three times
    that with the backward. (A plain FlopCounterMode has no formula for the in-place ``addmm_``.)"""
    from timm_pervit.layers import gates
    pos = make_micro().pos_attn
    h, w = 4, 5
    n, heads = h * w, pos.num_heads
    assert gates.use_offset_build(pos, len(pos.blocks))
    conv2 = len(pos.blocks) * 2 * 9 * 4 * heads * heads * n * n
    with torch.no_grad(), flop_counter_mode() as forward:
        pos.compute(h, w)
    assert forward.get_total_flops() >= conv2
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        pos.compute(h, w)
    assert plain.get_total_flops() < forward.get_total_flops()
    with flop_counter_mode() as training:
        torch.stack(pos.compute(h, w)).sum().backward()
    assert training.get_total_flops() >= 3 * conv2
