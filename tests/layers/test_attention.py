"""The attention kernel (timm_pervit.layers.attention): the fused CPU training path (flash kernel with a custom
backward) against the explicit formula, the kernel's own gradcheck, and the fallback where torch has no CPU
flash kernel."""
import copy

import pytest
import torch
import torch.nn as nn

from timm_pervit.layers import attention
from timm_pervit.layers.attention import _HAS_CPU_FLASH

from tests.conftest import make_micro


def _autograd_node_names(tensor):
    """Names of every node in the autograd graph behind ``tensor``."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_cpu_training_attention_matches_explicit_formula(dtype):
    """The fused training path on CPU (flash kernel + custom backward) gives the explicit formula's outputs and the
    gradients of every parameter, the position network's included."""
    torch.manual_seed(0)
    fused = make_micro(dtype=dtype).train()
    explicit = make_micro(dtype=dtype).train()
    explicit.load_state_dict(fused.state_dict())
    for blk in explicit.blocks:
        blk.attn.fused_attn = False
    x = torch.randn(3, 3, 48, 64, dtype=dtype)
    target = torch.randint(0, 10, (3,))
    outs = []
    for model in (fused, explicit):
        out = model(x)
        nn.functional.cross_entropy(out, target).backward()
        outs.append(out)
    # without the CPU flash op (torch < 2.3) the fused path is SDPA under checkpointing: same results, more compute
    assert ('PeripheralSdpaCpuBackward' in _autograd_node_names(outs[0])) == _HAS_CPU_FLASH
    assert 'PeripheralSdpaCpuBackward' not in _autograd_node_names(outs[1])
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    grads = dict(explicit.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, **tol, msg=lambda m: f'{name}: {m}')


@pytest.mark.skipif(not _HAS_CPU_FLASH, reason=f'torch {torch.__version__} has no CPU flash-attention op with a mask')
def test_cpu_training_attention_function_gradcheck():
    """The custom CPU attention function passes gradcheck (a packed qkv (B, N, 3, H, D), also non-contiguous, and a
    broadcast mask), agrees with SDPA on the unpacked q, k, v, and gives float32 gradients under bfloat16 autocast
    close to the float32 ones."""
    from timm_pervit.layers.attention import PeripheralSdpaCpu
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    qkv = torch.randn(2, 3, 3, 5, 4, **f64).transpose(1, 3).requires_grad_()  # (B=2, N=5, 3, H=3, D=4), strided
    mask = torch.randn(1, 3, 5, 5, **f64, requires_grad=True)
    assert not qkv.is_contiguous()
    assert torch.autograd.gradcheck(lambda *a: PeripheralSdpaCpu.apply(*a, 0.7), (qkv, mask))
    # the backward works in chunks of about chunk_bytes of attention: one query row of one sample, blocks of two
    # rows (an uneven tail), three whole samples (an uneven tail); also where only the mask needs a gradient (a
    # frozen qkv projection)
    qkv7 = torch.randn(7, 5, 3, 3, 4, **f64, requires_grad=True)
    for chunk_bytes in (1, 2 * 3 * 5 * 8, 3 * 3 * 5 * 5 * 8):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(PeripheralSdpaCpu, 'chunk_bytes', chunk_bytes)
            assert torch.autograd.gradcheck(lambda *a: PeripheralSdpaCpu.apply(*a, 0.7), (qkv7, mask))
            assert torch.autograd.gradcheck(lambda m: PeripheralSdpaCpu.apply(qkv7.detach(), m, 0.7), (mask,))

    def sdpa(packed, m):
        q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.7)

    grad_out = torch.randn(7, 3, 5, 4, **f64)
    out, grads = torch.autograd.functional.vjp(lambda *a: PeripheralSdpaCpu.apply(*a, 0.7), (qkv7, mask), grad_out)
    out_ref, grads_ref = torch.autograd.functional.vjp(sdpa, (qkv7, mask), grad_out)
    torch.testing.assert_close(out, out_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)

    inputs = [t.detach().float().requires_grad_() for t in (qkv, mask)]
    PeripheralSdpaCpu.apply(*inputs, 0.7).sum().backward()
    ref = [t.grad for t in inputs]
    inputs = [t.detach().float().requires_grad_() for t in (qkv, mask)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = PeripheralSdpaCpu.apply(*(t.to(torch.bfloat16) for t in inputs), 0.7)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
    for t, r in zip(inputs, ref):
        assert t.grad.dtype == torch.float32
        torch.testing.assert_close(t.grad, r, rtol=0, atol=0.1)


def test_cpu_training_attention_without_flash_kernel(monkeypatch):
    """Where torch has no CPU flash op with a mask, training attention is SDPA under checkpointing: the explicit
    formula's gradients, the position network's included."""
    monkeypatch.setattr(attention, '_HAS_CPU_FLASH', False)  # as on torch 2.1 / 2.2
    fused = make_micro(dtype=torch.float64).train()
    explicit = copy.deepcopy(fused)
    for blk in explicit.blocks:
        blk.attn.fused_attn = False
    x = torch.randn(2, 3, 48, 32, dtype=torch.float64)
    for model in (fused, explicit):
        nn.functional.cross_entropy(model(x), torch.tensor([0, 3])).backward()
    grads = dict(explicit.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-9, atol=1e-11, msg=name)
    assert fused.pos_attn.blocks[0].conv2.weight.grad.abs().sum() > 0
