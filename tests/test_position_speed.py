"""Speed of the position encoder (issue 13): compiled models keep the cache, the training build is exact."""
import pytest
import torch

from .conftest import make_micro


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
