"""The differential test matrix of PerViT's fast paths (timm_pervit.layers.gates).

Every case runs the micro model (the parity fixture's architecture, perturbed weights) through something users do to
timm models, with the fast paths on, and compares outputs and gradients with a reference: a fresh model from the same
state dict with every fast path off (``fast_paths=False``, plain autograd), in float64. A new fast path joins this
matrix. Tolerances are relative to the largest reference value: 1e-9 for float64 autograd, 1e-8 under torch.func
transforms.
"""
import copy
import io
import pickle
import warnings
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vmap
from torch.nn.utils import prune

from timm_pervit.layers import gates

from tests.conftest import REPO
from tests.conftest import cpu_half_conv
from tests.conftest import make_micro

X_SHAPE = (2, 3, 48, 64)  # a 3 x 4 token grid: non-square, so rows and columns cannot be swapped unnoticed


def _pair(dtype=torch.float64, **kwargs) -> Tuple[nn.Module, nn.Module]:
    """(fast, plain): two models with the same perturbed weights, one with the fast paths, one without."""
    torch.manual_seed(0)
    fast = make_micro(dtype=dtype, **kwargs)
    with torch.no_grad():  # off the initial values, so that no gradient is zero by symmetry
        for t in fast.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)
    plain = make_micro(dtype=dtype, fast_paths=False, **kwargs)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def _input(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*X_SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _rel(a: torch.Tensor, b: torch.Tensor, scale: float = 0.) -> float:
    """max |a - b| over max |b| (or over ``scale`` where b is smaller: a gradient that is zero by construction, such
    as a bias in front of a norm, is compared at the scale of the model's other gradients)."""
    denom = max(b.double().abs().max().item(), scale, 1e-30)
    return (a.double() - b.double()).abs().max().item() / denom


def _assert_rel(a: torch.Tensor, b: torch.Tensor, tol: float, what: str = '', scale: float = 0.) -> None:
    assert a.shape == b.shape, f'{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}'
    err = _rel(a, b, scale)
    assert err <= tol, f'{what}: relative error {err:.3g} > {tol:g}'


def _grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_grads(fast: nn.Module, plain: nn.Module, tol: float = 1e-9) -> None:
    got, want = _grads(fast), _grads(plain)
    assert got.keys() == want.keys()
    missing = [n for n, g in got.items() if g is None and want[n] is not None]
    assert not missing, f'{len(missing)} parameters got no gradient, e.g. {missing[:3]}'
    scale = 1e-3 * max(g.abs().max().item() for g in want.values() if g is not None)
    for name, g in want.items():
        if g is not None:
            _assert_rel(got[name], g, tol, name, scale)


def _assert_same_dicts(got: Dict, want: Dict, tol: float) -> None:
    scale = 1e-3 * max(g.abs().max().item() for g in want.values())
    for name, g in want.items():
        _assert_rel(got[name], g, tol, str(name), scale)


def _loss(out: torch.Tensor) -> torch.Tensor:
    # a fixed cotangent that mixes every logit (a plain sum would zero some gradients by symmetry)
    weights = torch.linspace(-1., 1., out.numel(), dtype=out.dtype).reshape(out.shape)
    return (out * weights).sum() + out.square().mean()


def _warm_cache(model: nn.Module, x: torch.Tensor) -> None:
    """A cached inference (eval mode, no autograd: no BatchNorm statistics move); the caller sets the mode again."""
    with torch.no_grad():
        model.eval()(x)
    assert model.pos_attn.cache_info()['entries'] == 1


def _freeze_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


MODES: Dict[str, Callable[[nn.Module], nn.Module]] = {
    'eval': lambda m: m.eval(),
    'train': lambda m: m.train(),
    'train_frozen_bn': lambda m: _freeze_bn(m.train()),
}


# ---- mode x autograd ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('mode', list(MODES))
@pytest.mark.parametrize('cache', ['cold', 'warm'])
def test_gradients_in_every_mode_cold_and_after_a_cached_inference(mode, cache):
    """Eval-mode autograd (frozen BatchNorm and dropout fine-tuning, saliency) gets every gradient, also after a
    cached inference; train mode likewise."""
    fast, plain = _pair()
    x = _input()
    for m in (fast, plain):
        MODES[mode](m)
    if cache == 'warm':
        _warm_cache(fast, x)
        MODES[mode](fast)
    _loss(fast(x)).backward()
    _loss(plain(x)).backward()
    _assert_same_grads(fast, plain)


def test_eval_mode_gradients_equal_frozen_bn_train_mode_gradients():
    """The issue's definition: eval with autograd on gives exactly what train mode with frozen BatchNorm gives."""
    ev, _ = _pair()
    tr, _ = _pair()
    x = _input()
    _warm_cache(ev, x)
    _loss(ev(x)).backward()
    _loss(_freeze_bn(tr.train())(x)).backward()
    _assert_same_grads(ev, tr)


@pytest.mark.parametrize('mode', list(MODES))
@pytest.mark.parametrize('grad_mode', ['no_grad', 'inference_mode'])
def test_outputs_without_autograd_use_the_cache(mode, grad_mode):
    fast, plain = _pair()
    x = _input()
    ctx = torch.no_grad if grad_mode == 'no_grad' else torch.inference_mode
    for m in (fast, plain):
        MODES[mode](m)
    with ctx():
        outs = [fast(x) for _ in range(2)]
        ref = plain(x)
    assert fast.pos_attn.cache_info()['entries'] == 1 and plain.pos_attn.cache_info()['entries'] == 0
    for out in outs:
        _assert_rel(out, ref, 1e-9)


@pytest.mark.parametrize('part', ['pos_attn', 'all_but_head', 'stem'])
def test_frozen_parts(part):
    """``requires_grad_(False)`` on parts: the others get exact gradients; frozen position parameters let training
    reuse the cached position attention."""
    fast, plain = _pair()
    x = _input()
    for m in (fast, plain):
        m.train()
        if part == 'all_but_head':
            m.requires_grad_(False)
            m.head.requires_grad_(True)
        else:
            getattr(m, part).requires_grad_(False)
    _loss(fast(x)).backward()
    _loss(plain(x)).backward()
    _assert_same_grads(fast, plain)
    assert fast.pos_attn.cache_info()['entries'] == (0 if part == 'stem' else 1)


# ---- second order ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_double_backward_gradient_penalty(mode):
    """WGAN-GP / R1: the gradient of the input-gradient norm, through every fast path's backward."""
    fast, plain = _pair()
    for model in (fast, plain):
        MODES[mode](model)
        x = _input().requires_grad_()
        g, = torch.autograd.grad(_loss(model(x)), x, create_graph=True)
        g.square().sum().backward()
    _assert_same_grads(fast, plain, 1e-8)


def test_double_backward_through_the_position_build():
    """Second-order gradients of the position parameters themselves (meta-learning style)."""
    fast, plain = _pair()
    results = []
    for model in (fast, plain):
        model.train()
        params = list(model.pos_attn.parameters())
        gs = torch.autograd.grad(_loss(model(_input())), params, create_graph=True)
        sum(g.square().sum() for g in gs).backward()
        results.append([p.grad for p in params])
    _assert_same_dicts(dict(enumerate(results[0])), dict(enumerate(results[1])), 1e-8)


# ---- torch.func ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('mode', ['eval', 'train_frozen_bn'])
@pytest.mark.parametrize('cache', ['cold', 'warm'])
def test_func_grad_over_functional_call(mode, cache):
    fast, plain = _pair()
    x = _input()
    for m in (fast, plain):
        MODES[mode](m)
    if cache == 'warm':
        _warm_cache(fast, x)
        MODES[mode](fast)
    params = {n: p.detach() for n, p in fast.named_parameters()}
    got = grad(lambda p: _loss(functional_call(fast, p, (x,))))(params)
    _loss(plain(x)).backward()
    _assert_same_dicts(got, {n: p.grad for n, p in plain.named_parameters()}, 1e-8)


def test_vmap_of_grad_per_sample_gradients():
    """Opacus-style per-sample gradients (DP-SGD): vmap(grad(...)) over the batch."""
    fast, plain = _pair()
    x = _input()
    for m in (fast, plain):
        _freeze_bn(m.train())
    params = {n: p.detach() for n, p in fast.named_parameters()}

    def sample_loss(p, xi):
        return _loss(functional_call(fast, p, (xi[None],)))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        plain.zero_grad()
        _loss(plain(x[i:i + 1])).backward()
        _assert_same_dicts({n: g[i] for n, g in per_sample.items()}, {n: p.grad for n, p in plain.named_parameters()},
                           1e-8)


@pytest.mark.parametrize('cache', ['cold', 'warm'])
def test_vmap_of_the_forward(cache):
    fast, plain = _pair()
    xs = torch.stack([_input(), _input() * 0.5])  # (2, B, C, H, W): vmap over the first dim
    fast.eval(), plain.eval()
    if cache == 'warm':
        _warm_cache(fast, xs[0])
    with torch.no_grad():
        out = vmap(fast)(xs)
        ref = torch.stack([plain(x) for x in xs])
    _assert_rel(out, ref, 1e-8)


def test_jacrev_wrt_the_input():
    fast, plain = _pair()
    x = torch.randn(1, 3, 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fast.eval(), plain.eval()
    jac = jacrev(lambda t: fast(t).sum(0))(x)  # (classes, 1, C, H, W)
    xr = x.clone().requires_grad_()
    ref = torch.stack([torch.autograd.grad(plain(xr)[0, c], xr)[0] for c in range(jac.shape[0])])
    _assert_rel(jac, ref, 1e-8)


@pytest.mark.parametrize('fused', [True, False], ids=['fused_attn', 'explicit_attn'])
@pytest.mark.parametrize('api', ['func_jvp', 'forward_ad'])
def test_forward_mode_ad(fused, api):
    """jvp = grad . v for a scalar function: checked against reverse mode of the plain model."""
    fast, plain = _pair()
    for m in (fast, plain):
        m.eval()
        for blk in m.blocks:
            blk.attn.fused_attn = fused
    x, v = _input(), torch.randn(*X_SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if api == 'func_jvp':
        _, tangent = jvp(lambda t: _loss(fast(t)), (x,), (v,))
    else:
        import torch.autograd.forward_ad as fwad
        with fwad.dual_level():
            tangent = fwad.unpack_dual(_loss(fast(fwad.make_dual(x, v)))).tangent
    xr = x.clone().requires_grad_()
    _loss(plain(xr)).backward()
    _assert_rel(tangent, (xr.grad * v).sum(), 1e-8)


def test_model_ensembling_with_stacked_state():
    """``stack_module_state`` + ``vmap`` over ``functional_call``: several weight sets in one call."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = make_micro(dtype=torch.float64).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        models.append(m)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to('meta')
    x = _input()
    with torch.no_grad():
        out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
        refs = []
        for m in models:
            m.set_fast_paths(False)
            refs.append(m(x))
    _assert_rel(out, torch.stack(refs), 1e-8)


# ---- what users attach to modules ------------------------------------------------------------------------------------

class _Scale(nn.Module):
    """A weight-scale parametrization whose state is a buffer (0-dim or per output channel)."""

    def __init__(self, shape):
        super().__init__()
        self.register_buffer('s', torch.full(shape, 1.5, dtype=torch.float64))

    def forward(self, w):
        return w * self.s


def _weight_norm(m):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # the hook-based one is deprecated (still in use)
        torch.nn.utils.weight_norm(m)


EDITS: Dict[str, Callable[[nn.Module], None]] = {
    'weight_norm_hook': lambda m: _weight_norm(m.pos_attn.blocks[1].conv1),
    'weight_norm_parametrization': lambda m: torch.nn.utils.parametrizations.weight_norm(m.pos_attn.dist_proj),
    'pruning': lambda m: prune.l1_unstructured(m.pos_attn.blocks[2].conv2, 'weight', amount=0.5),
    'parametrization_0dim_buffer': lambda m: parametrize.register_parametrization(
        m.pos_attn.blocks[0].conv1, 'weight', _Scale(())),
    'parametrization_ndim_buffer': lambda m: parametrize.register_parametrization(
        m.pos_attn.blocks[3].conv2, 'weight', _Scale((m.pos_attn.blocks[3].conv2.out_channels, 1, 1, 1))),
    'forward_hooks': lambda m: (
        m.pos_attn.blocks[4].conv1.register_forward_hook(lambda mod, i, o: o * 0.5),
        m.blocks[2].mlp.fc1.register_forward_hook(lambda mod, i, o: o + 0.1)),
    'subclassed_position_conv': lambda m: setattr(
        m.pos_attn.blocks[5], 'conv2', _ShiftedConv.of(m.pos_attn.blocks[5].conv2)),
}


class _ShiftedConv(nn.Conv2d):
    """A user subclass with its own forward: exact-type gates must not replace it by nn.Conv2d's formula."""

    @classmethod
    def of(cls, conv):
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, dtype=conv.weight.dtype)
        new.load_state_dict(conv.state_dict())
        return new

    def forward(self, x):
        return super().forward(x) + 0.25


@pytest.mark.parametrize('edit', list(EDITS))
def test_parametrizations_pruning_hooks_and_subclasses(edit):
    fast, plain = _pair()
    for m in (fast, plain):
        EDITS[edit](m)
    x = _input()
    fast.eval(), plain.eval()
    with torch.no_grad():
        _assert_rel(fast(x), plain(x), 1e-9, 'eval')
        for m in (fast, plain):  # a state change after a cached call: never stale
            for name, b in m.named_buffers():
                if name.endswith('.s') or name.endswith('weight_mask'):
                    b.mul_(0.5)
            for p in m.pos_attn.parameters():
                p.mul_(1.1)
        _assert_rel(fast(x), plain(x), 1e-9, 'eval after the change')
    for m in (fast, plain):
        _freeze_bn(m.train())
        _loss(m(x)).backward()
    _assert_same_grads(fast, plain)


def test_dynamic_int8_quantization():
    """``quantize_dynamic`` (the standard CPU recipe for transformers): runs, equals the plain quantized model, and
    agrees with float32 on top-1."""
    fast, plain = _pair(dtype=torch.float32)
    fast.eval(), plain.eval()
    x = _input(torch.float32)
    with torch.no_grad():
        ref32 = fast(x)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.ao's deprecation notice
        qfast = torch.ao.quantization.quantize_dynamic(fast, {nn.Linear}, dtype=torch.qint8)
        qplain = torch.ao.quantization.quantize_dynamic(plain, {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        out = [qfast(x) for _ in range(2)]
        ref = qplain(x)
    for o in out:
        _assert_rel(o, ref, 1e-5)
    assert qfast.pos_attn.cache_info()['entries'] == 1  # keyed on the int8 projection's packed values
    with torch.no_grad():  # new int8 weights for the projection: the cache follows
        for m in (qfast, qplain):
            proj = m.pos_attn.dist_proj
            proj.set_weight_bias(torch.quantize_per_tensor(proj.weight().dequantize() * 2, 0.01, 0, torch.qint8),
                                 proj.bias())
        _assert_rel(qfast(x), qplain(x), 1e-5)
    assert torch.equal(out[0].argmax(-1), ref32.argmax(-1))
    assert _rel(out[0], ref32) < 0.1


# ---- dtypes, layouts, copies ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bfloat16', 'float16'])
def test_half_precision_models(dtype):
    if not cpu_half_conv(dtype):
        pytest.skip(f'this torch has no {dtype} convolution on the CPU (torch 2.1)')
    fast, plain = _pair()
    x = _input()
    fast.to(dtype).eval(), plain.eval()
    with torch.no_grad():
        out = fast(x.to(dtype))
        ref = plain(x)
    assert out.dtype == dtype
    _assert_rel(out, ref, 0.05)
    _loss(_freeze_bn(fast.train())(x.to(dtype)).float()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters())


def test_autocast_bfloat16():
    fast, plain = _pair(dtype=torch.float32)
    x = _input(torch.float32)
    fast.eval(), plain.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out, ref = fast(x), plain(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    _assert_rel(out, ref, 0.02)


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_channels_last_inputs(mode):
    fast, plain = _pair()
    x = _input().contiguous(memory_format=torch.channels_last)
    for m in (fast, plain):
        MODES[mode](m)
    _assert_rel(fast(x), plain(x.contiguous()), 1e-9)
    _loss(fast(x)).backward()
    _loss(plain(x.contiguous())).backward()
    _assert_same_grads(fast, plain)


@pytest.mark.parametrize('how', ['deepcopy', 'pickle', 'torch_save'])
def test_copies_with_a_populated_cache(how):
    """A deep copy, a pickle and a whole-module torch.save / torch.load of a model with a populated cache: the copy
    starts with an empty cache and a cache lock of its own, and follows its own weights."""
    fast, plain = _pair()
    x = _input()
    fast.eval(), plain.eval()
    with torch.no_grad():
        fast(x)
        if how == 'deepcopy':
            clone = copy.deepcopy(fast)
        elif how == 'pickle':
            buf = io.BytesIO()
            pickle.dump(fast, buf)
            clone = pickle.loads(buf.getvalue())
        else:
            buf = io.BytesIO()
            torch.save(fast, buf)
            buf.seek(0)
            clone = torch.load(buf, weights_only=False)  # the test's own freshly saved module
        assert clone.pos_attn.cache_info()['entries'] == 0
        assert clone.pos_attn.cache_lock is not fast.pos_attn.cache_lock
        _assert_rel(clone(x), fast(x), 0.)  # the same weights: the same outputs
        for m in (clone, plain):
            for p in m.pos_attn.parameters():
                p.mul_(0.9)
        _assert_rel(clone(x), plain(x), 1e-9)
        _assert_rel(fast(x), plain(x), 1.)  # the original kept its own weights and cache
        assert fast.pos_attn.cache_info()['entries'] == 1


def test_timm_model_ema_over_training_steps():
    from timm.utils import ModelEmaV3
    fast, plain = _pair()
    emas = [ModelEmaV3(m, decay=0.5) for m in (fast, plain)]
    x = _input()
    for m in (fast, plain):
        m.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (fast, plain)]
    for _ in range(3):
        for m, opt, ema in zip((fast, plain), opts, emas):
            opt.zero_grad()
            _loss(m(x)).backward()
            opt.step()
            ema.update(m)
        with torch.no_grad():  # the EMA model evaluated between steps: its cache must follow every update
            _assert_rel(emas[0].module(x), emas[1].module(x), 1e-9)


# ---- compile, and the paths CUDA takes ------------------------------------------------------------------------------

@pytest.mark.slow
def test_torch_compile_eval_mode_gradients():
    fast, plain = _pair()
    x = _input()
    fast.eval(), plain.eval()
    # static shapes: with automatic dynamic shapes (after other sizes compiled in this process) torch 2.14's inductor
    # failed to lower this graph (a mask that needs a gradient takes the checkpointed SDPA under compile)
    compiled = torch.compile(fast, dynamic=False)
    with torch.no_grad():
        _assert_rel(compiled(x), plain(x), 1e-9)
    _loss(compiled(x)).backward()
    _loss(plain(x)).backward()
    _assert_same_grads(fast, plain)


@pytest.mark.parametrize('mode', list(MODES))
def test_the_paths_cuda_takes_forced_on_cpu(mode, monkeypatch):
    """The gates decide on the device type; reporting 'cuda' for every tensor takes the GPU's kernel choices (SDPA
    with a mask that needs a gradient, no CPU kernel) on every CI run, where no GPU is lent."""
    fast, plain = _pair()
    x = _input()
    for m in (fast, plain):
        MODES[mode](m)
    paths = []
    choose = gates.attention_path
    monkeypatch.setattr(gates, 'device_type', lambda t: 'cuda')
    monkeypatch.setattr(gates, 'attention_path', lambda *a: paths.append(choose(*a)) or paths[-1])
    from timm_pervit.layers import attention
    monkeypatch.setattr(attention, 'attention_path', gates.attention_path)
    _loss(fast(x)).backward()
    _loss(plain(x)).backward()
    _assert_same_grads(fast, plain)
    assert paths and set(paths) == {'sdpa'}


# ---- the gates choose the fast paths where they hold -----------------------------------------------------------------

def test_every_fast_path_is_taken_on_a_plain_model():
    """Each gate holds in its setting on the stock model (a gate that is never true would pass the matrix above)."""
    model, plain = _pair(dtype=torch.float32)
    x = _input(torch.float32)
    model.train()
    assert gates.use_offset_build(model.pos_attn, len(model.blocks))
    assert all(gates.use_folded_projection(model.pos_attn, blk) for blk in model.pos_attn.blocks)
    assert not gates.transforms_active()
    qkv = torch.randn(2, 12, 3, 2, 8)
    mask = torch.randn(1, 2, 12, 12, requires_grad=True)
    from timm_pervit.layers.attention import cpu_kernel_supports
    if cpu_kernel_supports(qkv, mask):  # torch >= 2.3 (the CPU flash op with a mask)
        assert gates.attention_path(qkv, mask) == 'cpu_kernel'
    assert not gates.use_position_cache(model.pos_attn)  # training: the position parameters need gradients
    model.eval()
    with torch.no_grad():
        assert gates.use_position_cache(model.pos_attn)
        assert all(gates.use_folded_stem(step) for step in model.stem[:-1])
        assert gates.use_channels_last_stem(model)
        assert all(gates.use_inplace_mlp(blk, x) for blk in model.blocks)
    assert not gates.use_position_cache(plain.pos_attn)
    assert not any(gates.use_folded_stem(step) for step in plain.stem[:-1])


@pytest.mark.parametrize('transform', ['grad', 'vmap', 'jvp', 'forward_ad'])
def test_transforms_are_detected(transform):
    seen = []

    def probe(t):
        seen.append(gates.transforms_active())
        return t.sum()

    t = torch.ones(3)
    if transform == 'grad':
        grad(probe)(t)
    elif transform == 'vmap':
        vmap(probe)(t[None])
    elif transform == 'jvp':
        jvp(probe, (t,), (t,))
    else:
        import torch.autograd.forward_ad as fwad
        with fwad.dual_level():
            probe(fwad.make_dual(t, t))
    assert seen == [True] and not gates.transforms_active()


def test_quantized_and_subclassed_modules_take_the_plain_paths():
    model, _ = _pair(dtype=torch.float32)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    x = _input(torch.float32)
    with torch.no_grad():
        assert not gates.use_offset_build(q.pos_attn, len(q.blocks))
        assert not gates.use_folded_projection(q.pos_attn, q.pos_attn.blocks[0])
        assert not any(gates.use_inplace_mlp(blk, x) for blk in q.blocks)
        assert F.softmax(q(x), -1).sum(-1).allclose(torch.ones(x.shape[0]))


def test_readme_example_runs():
    """The README's example of this section, run as written: eval-mode gradients reach the position encoder."""
    import re
    import timm
    readme = (REPO / 'README.md').read_text(encoding='utf-8')
    section = readme.split('## What you can do to the model', 1)[1]
    code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
    scope = {'timm': timm, 'torch': torch}
    exec(code, scope)  # noqa: S102 - the project's own README
    model = scope['model']
    assert all(p.grad is not None for p in model.pos_attn.parameters())
    assert model.pos_attn.cache_info()['entries'] == 1 and scope['logits'].shape == (1, 1000)
    assert scope['plain'].fast_paths is False
