"""Speed of the position encoder (issue 13): compiled models keep the cache, the training build is exact."""
import pytest
import torch

from timm_pervit.layers import gates

from tests.conftest import make_micro


def _count_builds(model):
    calls = []
    compute = model.pos_attn.compute
    model.pos_attn.compute = lambda h, w, *a, **k: calls.append((h, w)) or compute(h, w, *a, **k)
    return calls


@pytest.mark.slow
def test_compiled_model_reuses_the_position_cache():
    """The lookup runs outside the graph: one build for three calls, no recompilation for a cache hit."""
    model = make_micro().eval()
    calls = _count_builds(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs = [compiled(x) for _ in range(3)]
        n_graphs = len(graphs)
        ref = model(x)
    from torch._dynamo.symbolic_convert import InstructionTranslator
    if not hasattr(InstructionTranslator, 'current_tx'):
        # torch 2.1 does not tell whether a graph break is allowed (fullgraph=True): the graph rebuilds the
        # position attention in every call (README, Compatibility), with the same result
        assert calls == [(4, 6)] * 2  # traced into the graph once (it runs in every call), then the eager build
        for out in outs:
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        return
    assert calls == [(4, 6)]
    with torch.no_grad():
        compiled(x)
    assert len(graphs) == n_graphs  # no recompilation
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with torch.no_grad():  # a value change through .data is still seen by the compiled model
        model.pos_attn.blocks[7].norm2.bias.data.add_(1.0)
        out = compiled(x)
    assert calls == [(4, 6), (4, 6)]
    model.pos_attn.clear_cache()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_fullgraph_still_works():
    """No graph break is possible under fullgraph=True: the graph recomputes the position attention."""
    model = make_micro().eval()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs = [compiled(x) for _ in range(3)]
        ref = model(x)
    assert len(graphs) == 1
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _perturbed_micro(**kwargs):
    model = make_micro(dtype=torch.float64, **kwargs).train()
    with torch.no_grad():
        for p in model.pos_attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize('chunk_bytes', [1, 30000, None], ids=['row', 'rows', 'default'])
@pytest.mark.parametrize('grid', [(3, 5), (6, 4), (2, 2)])
def test_offset_grid_build_matches_the_reference_with_gradients(grid, chunk_bytes):
    """The training build through the key-query offset grid equals the unfolded official formulation.

    Chunks of one row of queries, of two (an uneven last chunk for 3 rows), and the default (all rows at once here).
    """
    from timm_pervit.tools.reference import official_position_attention
    h, w = grid
    model = _perturbed_micro()
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


def test_training_step_same_with_and_without_the_offset_grid_path():
    """A whole training step (loss, every gradient) is the same as through the plain modules (forced by a hook)."""
    model = _perturbed_micro()
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
    from timm_pervit.tools.reference import official_position_attention
    model = _perturbed_micro().eval()
    ref = torch.stack(official_position_attention(model, 4, 7)).log()
    with torch.no_grad():
        served = torch.stack(model.pos_attn(4, 7))
    torch.testing.assert_close(served, ref, rtol=0, atol=1e-10)
    model.float()
    with torch.no_grad():
        served32 = torch.stack(model.pos_attn(4, 7))
    torch.testing.assert_close(served32.double(), ref, rtol=0, atol=1e-4)
