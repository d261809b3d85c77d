"""The gates of PerViT's fast paths: one predicate per path, built on facts, never on module mode.

Every optimisation of the model runs only where its predicate here says that its assumptions hold; everything else
takes the plain path (the modules called as such, autograd recording every op). The facts a gate may read:

* autograd: ``torch.is_grad_enabled()`` and the ``requires_grad`` of the tensors involved;
* exact module types (``type(m) is nn.Linear``): subclasses, quantized, parametrized or hooked modules run as such;
* dtype, device type and autocast;
* transforms: while a ``torch.func`` transform (grad, vmap, jvp, jacrev, ...) or forward-mode AD is active, every
  fast path is off (their custom kernels have no batching or forward-derivative rules);
* tracing: torch.compile, torch.export / ONNX / ``jit.trace``, FX symbolic tracing.

A module's train/eval flag counts only where it changes the module's own formula (BatchNorm's statistics, dropout).
Every model part has a ``fast_paths`` attribute (``PerViT(fast_paths=False)`` or ``model.set_fast_paths(False)``): off,
the whole model takes the plain path.

Private torch facts are read only where no public API tells the same, each behind a fallback to the plain path:
``torch._C._functorch.peek_interpreter_stack`` and ``torch.autograd.forward_ad._current_level`` (is a transform active),
the registries of global module hooks in ``torch.nn.modules.module`` (hooks that must see every position module run)
and ``torch.utils.module_tracker``'s hook owner (FlopCounterMode's tracker, which need not see them).

=======================  ===========================  ==========================================================
fast path                gate                         plain path
=======================  ===========================  ==========================================================
position cache           ``use_position_cache``       the position attention computed on every call
offset-grid build        ``use_offset_build``         ``PositionConvNet`` on every query's distance map
folded projection        ``use_folded_projection``    the distance projection, then conv1, as modules
stem BatchNorm fold      ``use_folded_stem``          conv, then BatchNorm
channels-last stem       ``use_channels_last_stem``   the stem on the input's layout
in-place inference MLP   ``use_inplace_mlp``          the MLP module and the residual add
CPU attention kernel     ``attention_path``           ``F.scaled_dot_product_attention``
=======================  ===========================  ==========================================================

A new fast path gets a predicate here and a case in the differential test matrix (tests/layers/test_engine_matrix.py).
"""
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize, prune
from torch.nn.utils.weight_norm import WeightNorm

from timm.layers import DropPath, Mlp

from .._compat import autocast_dtype, is_compiling, is_exporting, is_fx_tracing

try:  # torch's functorch interpreter stack: None when no torch.func transform is active
    from torch._C._functorch import peek_interpreter_stack as _peek_interpreter_stack
except ImportError:  # not in this torch build: every transform check answers "active" (the plain path)
    _peek_interpreter_stack = None

__all__ = [
    'transforms_active', 'needs_grad', 'device_type', 'has_hooks', 'is_plain', 'is_stock', 'global_hooks',
    'has_opaque_hooks', 'base_type', 'is_plain_channel_norm', 'use_position_cache', 'use_offset_build',
    'use_folded_projection', 'use_folded_stem', 'use_channels_last_stem', 'use_inplace_mlp', 'attention_path',
]

#: Forward pre-hooks whose effect is a function of the module's own parameters and buffers (pruning masks, the
#: hook-based weight norm): the position cache can key on those tensors' values instead of bypassing itself.
_PURE_PRE_HOOKS = (prune.BasePruningMethod, WeightNorm)

#: Module-level registries of hooks that run for every module (``torch.nn.modules.module.register_module_*_hook``).
_GLOBAL_HOOK_REGISTRIES = (
    '_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks', '_global_backward_pre_hooks')


# ---- facts ----------------------------------------------------------------------------------------------------------

def transforms_active() -> bool:
    """True while a ``torch.func`` transform or forward-mode AD is active (or where torch cannot tell).

    While torch.compile traces, False: dynamo runs transforms itself, and the paths it traces take no custom kernel.
    """
    if is_compiling():
        return False
    level = getattr(forward_ad, '_current_level', None)
    if _peek_interpreter_stack is None or not isinstance(level, int):
        return True
    return level >= 0 or _peek_interpreter_stack() is not None


def needs_grad(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether autograd records this call and will want gradients of any of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def device_type(t: torch.Tensor) -> str:
    """The device type the gates decide on (the one seam the test matrix uses to take the CUDA paths on CPU)."""
    return t.device.type


def has_hooks(module: nn.Module) -> bool:
    """True when calling ``module`` runs hooks of its own, so its forward cannot be replaced by its formula."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def is_plain(module: nn.Module) -> bool:
    """True for a module whose call is exactly its formula on its own parameters (no hooks, no parametrization)."""
    # ``parametrize.is_parametrized``'s own test, written out: torch.compile of torch 2.1 cannot trace a call of
    # that torch function with a module argument (this runs in forward)
    return not (has_hooks(module) or isinstance(getattr(module, 'parametrizations', None), nn.ModuleDict))


def is_stock(module: Any, cls: type) -> bool:
    """Exactly a ``cls`` (no subclass, no quantized or parametrized stand-in), with nothing attached."""
    return type(module) is cls and is_plain(module)


def base_type(module: nn.Module) -> type:
    """The module's class before any parametrization was registered (which swaps in a generated subclass)."""
    return parametrize.type_before_parametrizations(module)


def has_opaque_hooks(module: nn.Module) -> bool:
    """True when ``module`` runs a hook whose effect is not a function of its parameters and buffers alone."""
    if module._forward_hooks or module._backward_hooks or module._backward_pre_hooks:
        return True
    return any(not isinstance(hook, _PURE_PRE_HOOKS) for hook in module._forward_pre_hooks.values())


def _hierarchy_tracker(hook: Any) -> bool:
    """True for a hook of torch's ``ModuleTracker`` (``FlopCounterMode`` installs it for every module).

    It only records which module runs, to attribute work to it: it must not switch PerViT to another formulation than
    the one being measured.
    """
    owner = getattr(hook, '__self__', None)
    return type(owner).__module__ == 'torch.utils.module_tracker' and type(owner).__name__ == 'ModuleTracker'


def global_hooks() -> bool:
    """True when hooks registered for all modules exist: they must see the position modules being called."""
    registry = torch.nn.modules.module
    return any(not _hierarchy_tracker(hook)
               for name in _GLOBAL_HOOK_REGISTRIES for hook in (getattr(registry, name, None) or {}).values())


def is_plain_channel_norm(m: nn.Module) -> bool:
    """A stock affine GroupNorm with one channel per group and nothing attached (hooks, parametrizations)."""
    return is_stock(m, nn.GroupNorm) and m.num_groups == m.num_channels and m.affine


def _fast(module: nn.Module) -> bool:
    return bool(getattr(module, 'fast_paths', True))


# ---- position attention (timm_pervit.layers.position) ---------------------------------------------------------------

def use_position_cache(pos: nn.Module) -> bool:
    """The inference cache of ``PeripheralPosition``: a hit returns tensors computed earlier without autograd.

    Only when autograd will not want gradients of any position parameter (whatever the module mode: eval-mode
    fine-tuning and analysis get their gradients), outside transforms, exports and FX traces, and with a positive
    bound. The cache also checks, at lookup, that it can key on every value the result depends on (stock layers,
    pruning and weight norm, parametrizations); anything else is recomputed (``PeripheralPosition._state``).
    """
    if not _fast(pos) or pos.cache_size <= 0 or pos.cache_bytes <= 0:
        return False
    if is_exporting() or is_fx_tracing() or transforms_active():
        return False
    return not needs_grad(pos.parameters())


def _offset_block(blk: nn.Module) -> bool:
    from .position import PositionConvNet  # here, not at the top: the engine imports this module
    if type(blk) is not PositionConvNet or not is_plain(blk):
        return False
    convs = all(
        is_stock(c, nn.Conv2d) and c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (0, 0)
        and c.dilation == (1, 1) and c.groups == 1 and c.bias is not None and c.padding_mode == 'zeros'
        for c in (blk.conv1, blk.conv2))
    return convs and is_plain_channel_norm(blk.norm1) and is_plain_channel_norm(blk.norm2)


def use_offset_build(pos: nn.Module, num_blocks: int) -> bool:
    """The key-query offset-grid build (``PositionConvNet.forward_offsets`` and its autograd Function).

    Stock layers only, float32/float64 without autocast (low precision keeps torch's norm kernels), eager (traced
    graphs keep the formulation of ``distances``), outside transforms, and not while hooks for all modules must see
    each module run. Second-order gradients are supported (its backward is differentiable when autograd records it).
    """
    if not _fast(pos) or is_compiling() or is_exporting() or is_fx_tracing() or transforms_active():
        return False
    proj = pos.dist_proj
    if not (is_stock(proj, nn.Linear) and proj.in_features == 1 and proj.bias is not None):
        return False
    weight = proj.weight
    if weight.dtype not in (torch.float32, torch.float64) or autocast_dtype(device_type(weight)) is not None:
        return False
    return not global_hooks() and all(_offset_block(blk) for blk in pos.blocks[:num_blocks])


def use_folded_projection(pos: nn.Module, blk: nn.Module) -> bool:
    """Fold the shared ``Linear(1, 4H)`` distance projection into a block's first conv (exact: both are linear).

    Stock, plain layers only (a hook or parametrization must see its module called), outside transforms.
    """
    proj, conv1 = pos.dist_proj, blk.conv1
    return _fast(pos) and is_stock(proj, nn.Linear) and proj.in_features == 1 and proj.bias is not None \
        and is_stock(conv1, nn.Conv2d) and conv1.bias is not None and not global_hooks() and not transforms_active()


# ---- model parts (timm_pervit.pervit) -------------------------------------------------------------------------------

def use_folded_stem(step: nn.Module) -> bool:
    """Fold a stem step's BatchNorm into its conv (``conv_bn_eval``): exact where the BatchNorm uses running stats.

    The BatchNorm's own mode decides (its formula), stock plain modules only, not while traced for export (FX traces
    fold too, as one node, so traced and eager eval models agree exactly), outside transforms.
    """
    conv, bn = step.conv, step.bn
    if not _fast(step) or not is_stock(bn, nn.BatchNorm2d) or not is_stock(conv, nn.Conv2d):
        return False
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return False
    return conv.padding_mode == 'zeros' and conv.dilation == (1, 1) and conv.groups == 1 \
        and not (is_exporting() or global_hooks() or transforms_active())


def use_channels_last_stem(model: nn.Module) -> bool:
    """Run the stem channels-last (faster on CPU; its output is the NHWC token grid).

    Only while no BatchNorm of the stem gathers batch statistics (torch's channels-last BatchNorm gathers them less
    precisely than the NCHW kernel: docs/benchmarks.md) and outside transforms (vmap cannot change memory formats).
    """
    if not _fast(model) or transforms_active():
        return False
    return not any(m.training for m in model.stem.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def _identity_at_inference(m: nn.Module) -> bool:
    """A stock identity, or a stock dropout / stochastic depth that is switched off (eval mode or probability 0)."""
    if is_stock(m, nn.Identity):
        return True
    if is_stock(m, nn.Dropout):
        return not m.training or m.p == 0.
    return is_stock(m, DropPath) and (not m.training or m.drop_prob == 0.)


def use_inplace_mlp(block: nn.Module, x: torch.Tensor) -> bool:
    """Run a block's MLP branch on its own fresh tensors in place: GELU over fc1's output, the residual added into
    fc2's output (two activation-sized allocations fewer per block).

    Only while autograd records nothing, eager, in x's own dtype (no autocast: the plain residual add would promote),
    outside transforms, and for the stock timm ``Mlp`` (stock Linears, GELU, identity norm) whose skipped dropouts are
    identities, with no hook on any part (fc1 and fc2 still run as modules).
    """
    if not _fast(block) or torch.is_grad_enabled() or is_fx_tracing() or is_compiling() or is_exporting():
        return False
    mlp = block.mlp
    if type(mlp) is not Mlp or not is_plain(mlp) or not is_stock(mlp.act, nn.GELU) or type(mlp.norm) is not nn.Identity:
        return False
    if not (is_stock(mlp.fc1, nn.Linear) and is_stock(mlp.fc2, nn.Linear)):
        return False
    drops = (mlp.drop1, mlp.drop2, block.drop_path2)
    if not all(_identity_at_inference(m) for m in drops):
        return False
    return autocast_dtype(device_type(x)) is None and not global_hooks() and not transforms_active()


def attention_path(qkv: torch.Tensor, mask: torch.Tensor, fast: bool = True) -> str:
    """Which kernel ``peripheral_sdpa`` runs: 'math' (the explicit softmax formula, under transforms: SDPA's CPU
    kernels have neither batching nor forward-derivative rules), 'sdpa' (``F.scaled_dot_product_attention``, also
    the plain path), 'cpu_kernel' (``PeripheralSdpaCpu``: eager CPU, the mask needs a gradient, a dtype of the CPU
    flash op) or 'checkpointed_sdpa' (the mask needs a gradient where the CPU kernel cannot run: SDPA recomputed in
    backward instead of keeping every block's attention).
    """
    from .attention import cpu_kernel_supports  # here, not at the top: the kernel module imports this one
    if transforms_active():
        return 'math'
    if not fast or is_fx_tracing() or not needs_grad((mask,)) or device_type(mask) in ('cuda', 'meta'):
        return 'sdpa'
    if not (is_compiling() or is_exporting()) and device_type(qkv) == 'cpu' and cpu_kernel_supports(qkv, mask):
        return 'cpu_kernel'
    return 'checkpointed_sdpa'
