"""The build of the position attention phi_p (PeripheralPosition.compute): the distances of the normalized grid, the
key-query offset-grid build against the official unfolded formulation (values and gradients, every chunking), its
gradcheck, and what phi_p is: a peripheral weighting that, combined with the content attention, gives each query a
distribution over the keys of the grid."""
import copy

import pytest
import torch
from torch.func import functional_call

from timm_pervit.layers import gates
from timm_pervit.tools.reference import official_position_attention

from tests.conftest import make_micro
from tests.conftest import perturbed_micro


def test_distances_equal_linspace_coordinates():
    """The shape-generic distances are the distances between ``linspace(-1, 1, n)`` coordinates (extended by two
    steps on each side for the keys), up to float rounding, and exactly zero at the query's own position."""
    pos = make_micro(dtype=torch.float64).pos_attn
    for h, w in [(2, 2), (14, 14), (10, 16), (5, 31)]:
        axes_q, axes_k = [], []
        for n in (h, w):
            step = 2. / (n - 1)
            axes_q.append(torch.linspace(-1., 1., n, dtype=torch.float64))
            axes_k.append(torch.linspace(-1. - 2 * step, 1. + 2 * step, n + 4, dtype=torch.float64))
        qy, qx = torch.meshgrid(*axes_q, indexing='ij')
        ky, kx = torch.meshgrid(*axes_k, indexing='ij')
        dy = qy.reshape(-1, 1, 1) - ky
        dx = qx.reshape(-1, 1, 1) - kx
        expected = torch.sqrt(dy * dy + dx * dx).unsqueeze(1)
        dist = pos.distances(h, w)
        torch.testing.assert_close(dist, expected, rtol=0, atol=1e-12)
        inner = dist[:, 0, 2:-2, 2:-2].reshape(h * w, h * w)
        assert torch.all(inner.diagonal() == 0)


@pytest.mark.parametrize('chunk_bytes', [1, 30000, None], ids=['row', 'rows', 'default'])
@pytest.mark.parametrize('grid', [(3, 5), (6, 4), (2, 2)])
def test_offset_grid_build_matches_the_reference_with_gradients(grid, chunk_bytes):
    """The training build through the key-query offset grid equals the unfolded official formulation.

    Chunks of one row of queries, of two (an uneven last chunk for 3 rows), and the default (all rows at once here).
    """
    h, w = grid
    model = perturbed_micro(dtype=torch.float64).train()
    pos = model.pos_attn
    if chunk_bytes is not None:
        pos.chunk_bytes = chunk_bytes
    assert gates.use_offset_build(pos, len(pos.blocks))  # the plain model takes the offset-grid path
    fast = torch.stack(pos.compute(h, w))
    cotangent = torch.randn_like(fast)
    (fast * cotangent).sum().backward()
    grads = {k: p.grad.clone() for k, p in pos.named_parameters()}
    model.zero_grad()
    ref = torch.stack(official_position_attention(model, h, w)).log()
    (ref * cotangent).sum().backward()
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)
    for name, p in pos.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-7, atol=1e-10, msg=lambda m: f'{name}: {m}')


def test_offset_grid_build_passes_gradcheck():
    """The training build of the position attention (an autograd Function with a hand-written backward) passes
    gradcheck for every parameter it uses (the shared distance projection and two blocks' conv networks), with one
    query per chunk, three queries per chunk (rows of four: an uneven tail) and all queries in one chunk. (On torch
    2.1 a strided gradient handed to the GroupNorm backward kernel gave wrong gradients without any error.)"""
    torch.manual_seed(0)
    pos = make_micro(dtype=torch.float64).pos_attn
    h, w = 3, 4
    used = {k: p for k, p in pos.named_parameters() if k.startswith(('dist_proj.', 'blocks.0.', 'blocks.1.'))}
    names = list(used)
    params = [(p.detach() + 0.1 * torch.randn_like(p)).requires_grad_() for p in used.values()]
    assert gates.use_offset_build(pos, 2)
    # one window of conv2 input: 4H channels x (h+2)(w+2) positions
    window = 4 * pos.num_heads * (h + 2) * (w + 2) * 8
    # the full Jacobian for the uneven chunks; random projections of it (gradcheck's fast mode) for the others
    for chunk_bytes, fast_mode in ((3 * window, False), (1, True), (1 << 22, True)):
        pos.chunk_bytes = chunk_bytes
        assert torch.autograd.gradcheck(
            lambda *a: torch.stack(functional_call(pos, dict(zip(names, a)), (h, w, 2))), params, eps=1e-6, atol=1e-5,
            fast_mode=fast_mode)


def test_training_step_same_with_and_without_the_offset_grid_path():
    """A whole training step (loss, every gradient) is the same as through the plain modules (forced by a hook)."""
    model = perturbed_micro(dtype=torch.float64).train()
    x = torch.randn(2, 3, 48, 80, dtype=torch.float64)
    results = []
    for force_modules in (False, True):
        model.zero_grad()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None) if force_modules \
            else None
        try:
            assert gates.use_offset_build(model.pos_attn, len(model.blocks)) is not force_modules
            out = model(x)
            out.square().mean().backward()
        finally:
            if handle is not None:
                handle.remove()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-7, atol=1e-12, msg=lambda m: f'{name}: {m}')


def test_offset_grid_build_at_inference_and_in_float32():
    """Eval-mode builds (a cache miss) take the same path; float32 agrees with the float64 reference closely."""
    model = perturbed_micro(dtype=torch.float64).eval()
    ref = torch.stack(official_position_attention(model, 4, 7)).log()
    with torch.no_grad():
        served = torch.stack(model.pos_attn(4, 7))
    torch.testing.assert_close(served, ref, rtol=0, atol=1e-10)
    model.float()
    with torch.no_grad():
        served32 = torch.stack(model.pos_attn(4, 7))
    torch.testing.assert_close(served32.double(), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize('size', [(224, 224), (160, 96)])
def test_attention_rows_are_distributions_over_the_grid_and_phi_peaks_at_the_query(size):
    """The paper's peripheral attention: phi_p in (0, 1) weights the content attention exp(q.k / sqrt(d)), and each
    query's row is L1-normalized over the h*w keys of the grid. So, through the model's own attention module (fused
    and explicit path): (1) whatever q and k, every row sums to 1 (v = 1 gives 1); (2) with no content (q = k = 0)
    the attention is exactly phi_p normalized over the keys. And after the peripheral initialization (3) every
    block's phi_p peaks at the query itself, the first block is local (its nearest keys weigh far more than its
    farthest) and each deeper block is more global, the last one nearly uniform over the grid."""
    model = make_micro(dtype=torch.float64).eval()
    h, w = size[0] // 16, size[1] // 16
    n = h * w
    phi = model.position_attention((h, w))
    assert phi.shape == (12, 2, n, n)
    assert torch.all(phi > 0) and torch.all(phi < 1)
    with torch.no_grad():  # what the model attends with at inference (through the cache) is this phi_p
        torch.testing.assert_close(torch.stack(model.pos_attn(h, w)).exp(), phi, rtol=0, atol=1e-15)

    # (3) peripheral: a peak at the query, local first, global last
    dist = model.pos_attn.distances(h, w)[:, 0, 2:-2, 2:-2].reshape(n, n).double()
    assert torch.equal(phi.argmax(-1), torch.arange(n).expand(12, 2, n))
    step = dist[dist > 0].min()
    nearest = phi[0][:, (dist - step).abs() < 1e-9].reshape(2, -1)  # per head: the keys one step away, every query
    farthest = phi[0].gather(-1, dist.argmax(-1).expand(2, n)[..., None])[..., 0]
    assert nearest.min() > 10 * farthest.max()
    contrast = (phi.amax(-1) / phi.amin(-1)).amax((1, 2))  # per block: the most peaked query's max / min weight
    assert torch.all(contrast[1:] < contrast[:-1]), contrast
    assert contrast[0] > 100 and contrast[-1] < 1.01

    # (1) and (2) through the block's attention: proj = identity, v = the tokens' channel 0 in every channel
    attn = copy.deepcopy(model.blocks[0].attn)
    c, d = attn.qkv.in_features, attn.head_dim
    pos_log = phi[0].log()
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(c, dtype=torch.float64))
        attn.proj.bias.zero_()
        wq, wk, wv = attn.qkv.weight.view(3, c, c)
        wv.zero_()
        wv[:, 0] = 1.
        x = torch.randn(2, n, c, dtype=torch.float64)
        x[..., 0] = 1.
        for fused in (True, False):
            attn.fused_attn = fused
            out = attn(x, pos_log)
            torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-12)
        wq.zero_()
        wk.zero_()
        key_value = torch.linspace(-1., 1., n, dtype=torch.float64) ** 3  # any value per key
        x = torch.zeros(1, n, c, dtype=torch.float64)
        x[0, :, 0] = key_value
        expected = (phi[0] @ key_value) / phi[0].sum(-1)  # (heads, queries): the phi-weighted mean of the values
        for fused in (True, False):
            attn.fused_attn = fused
            out = attn(x, pos_log)[0]  # (queries, channels); channel j belongs to head j // head_dim
            torch.testing.assert_close(out, expected.T.repeat_interleave(d, dim=1), rtol=0, atol=1e-12)
