"""The initialization of the paper: peripheral position encoding (local to global with depth), truncated-normal
transformer weights."""
import pytest
import timm
import torch

from tests.conftest import make_micro


def test_peripheral_initialization():
    model = make_micro()
    pos = model.pos_attn
    assert torch.all(pos.dist_proj.weight == -0.02) and torch.all(pos.dist_proj.bias == 0)
    for i, blk in enumerate(pos.blocks):
        assert torch.all(blk.conv1.weight == 0.02) and torch.all(blk.conv2.weight == 0.02)
        assert torch.all(blk.conv1.bias == 0) and torch.all(blk.conv2.bias == 0)
        assert torch.all(blk.norm1.weight == 1) and torch.all(blk.norm1.bias == 0)
        assert blk.norm2.bias[0].item() == pytest.approx(torch.linspace(-5, 4, 12)[i].item())
        assert blk.norm2.weight[0].item() == pytest.approx(torch.linspace(3, 0.01, 12)[i].item())
    big = timm.create_model('pervit_small')
    qkv = torch.cat([b.attn.qkv.weight.flatten() for b in big.blocks])
    assert qkv.std().item() == pytest.approx(0.02, rel=0.15) and qkv.mean().abs() < 1e-3
    assert torch.all(big.blocks[0].mlp.fc1.bias == 0) and torch.all(big.norm.weight == 1)
    # deeper blocks start out more global: the initial position attention spreads further
    phi = model.position_attention(6)
    dist = model.pos_attn.distances(6, 6)[:, 0, 2:-2, 2:-2].reshape(36, 36)
    spread = [((p * dist).sum(-1) / p.sum(-1)).mean().item() for p in phi]
    assert spread[-1] > spread[0]
