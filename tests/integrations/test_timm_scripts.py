"""What timm's train.py / validate.py / benchmark.py ask of a model, called the way those scripts call it.

The scripts are not part of the timm wheel, so each test reproduces the exact calls they make (argument names, the
``None`` defaults they pass, the order of operations). Micro models keep them cheap; the official-checkpoint test
uses the real ``pervit_tiny`` because ``--pretrained-path`` is about the released layout.
"""
import argparse
import copy
import math
import random
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import (
    FastCollateMixup, create_dataset, create_loader, create_transform, resolve_data_config, resolve_model_data_config)
from timm.layers import set_layer_config
from timm.loss import SoftTargetCrossEntropy
from timm.models import load_checkpoint, resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver, ModelEmaV3, ParseKwargs, accuracy

from timm_pervit import PerViT
from timm_pervit.tools.recipes import SAFE_AUGMENTATION, augmentation_problem

from tests.conftest import MICRO_ARCH
from tests.conftest import fresh_eval


def train_py_create_model(name: str, **overrides) -> torch.nn.Module:
    """``timm.create_model`` with train.py's arguments at their defaults (None where train.py passes None)."""
    args = dict(
        pretrained=False, in_chans=3, num_classes=None, drop_rate=0.0, drop_path_rate=None, drop_block_rate=None,
        global_pool=None, bn_momentum=None, bn_eps=None, scriptable=False, checkpoint_path='')
    model_kwargs = overrides.pop('model_kwargs', {})
    args.update(overrides)
    return timm.create_model(name, **args, **model_kwargs)


def test_create_model_with_train_py_arguments():
    model = train_py_create_model(
        'pervit_small', num_classes=7, drop_rate=0.1, drop_path_rate=0.1, model_kwargs=MICRO_ARCH)
    assert isinstance(model, PerViT) and model.num_classes == 7 and model.head_drop.p == pytest.approx(0.1)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    gray = train_py_create_model('pervit_tiny', in_chans=1, num_classes=3, global_pool='avg', model_kwargs=MICRO_ARCH)
    assert gray.eval()(torch.randn(2, 1, 48, 64)).shape == (2, 3)
    # factory kwargs (train.py --device / --model-dtype)
    bf16 = train_py_create_model('pervit_tiny', model_kwargs=dict(MICRO_ARCH, device='cpu', dtype=torch.bfloat16))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.eval()(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bn_momentum_and_eps_options():
    """train.py --bn-momentum / --bn-eps reach the stem's BatchNorms (the only BatchNorms of PerViT)."""
    model = train_py_create_model('pervit_tiny', bn_momentum=0.01, bn_eps=1e-3, model_kwargs=MICRO_ARCH)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 4 and all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)
    default = train_py_create_model('pervit_tiny', model_kwargs=MICRO_ARCH)
    assert all(m.momentum == 0.1 and m.eps == 1e-5 for m in default.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_model_kwargs_option():
    """train.py's `--model-kwargs key=value ...` (timm's ParseKwargs) reaches the PerViT constructor."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    typed = [f'{k}={v!r}'.replace(' ', '') for k, v in MICRO_ARCH.items()]  # e.g. embed_dims=(16,24,32,40)
    args = parser.parse_args(['--model-kwargs', *typed, 'mlp_ratio=2.0'])
    model = train_py_create_model('pervit_medium', num_classes=4, model_kwargs=args.model_kwargs)
    assert model.num_heads == MICRO_ARCH['num_heads'] and model.num_features == MICRO_ARCH['embed_dims'][-1]
    assert model.blocks[0].mlp.fc1.out_features == 2 * MICRO_ARCH['embed_dims'][0]


def test_torchscript_option():
    """train.py --torchscript: create_model(..., scriptable=True) then torch.jit.script."""
    model = train_py_create_model('pervit_tiny', num_classes=3, scriptable=True, model_kwargs=MICRO_ARCH).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 48, 32)
    torch.testing.assert_close(scripted(x), fresh_eval(model, x))


@pytest.mark.parametrize('name', ['pervit_tiny', 'pervit_small', 'pervit_medium'])
def test_data_config_and_eval_transform(name):
    """validate.py / train.py: resolve_data_config(vars(args), model=model) -> 224, crop 0.875 (resize 256), bicubic."""
    model = timm.create_model(name, num_classes=0, **MICRO_ARCH)
    validate_args = dict(img_size=None, input_size=None, crop_pct=None, crop_mode=None, mean=None, std=None,
                         interpolation='', model=name)
    for cfg in (resolve_data_config(validate_args, model=model), resolve_model_data_config(model)):
        assert cfg['input_size'] == (3, 224, 224) and cfg['interpolation'] == 'bicubic'
        assert cfg['crop_pct'] == pytest.approx(0.875) and cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN
    tf = create_transform(**resolve_data_config(validate_args, model=model), is_training=False)
    resize, crop = tf.transforms[:2]
    assert resize.size == 256 and resize.interpolation.value == 'bicubic' and tuple(crop.size) == (224, 224)
    # a different test size (validate.py --img-size 288): still crop 0.875, and the model takes it
    cfg = resolve_data_config(dict(validate_args, img_size=288), model=model)
    tf = create_transform(**cfg, is_training=False)
    assert tf.transforms[0].size == math.floor(288 / 0.875)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    assert model.eval()(tf(image).unsqueeze(0)).shape == (1, 40)


def _scale_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group['params']:
            out[by_id[id(p)]] = (group.get('lr_scale', 1.0), group['weight_decay'])
    return out


def test_layer_decay_and_weight_decay_groups():
    """train.py --layer-decay 0.65 --weight-decay 0.05: create_optimizer_v2 uses group_matcher/no_weight_decay.

    A block and its position encoder share one layer-decay group (one lr scale), one step per block; the stem and the
    shared distance projection form the first group, the final norm and the head the last."""
    from timm.models import group_parameters
    model = timm.create_model('pervit_tiny', num_classes=5, **MICRO_ARCH)
    names = [n for n, _ in model.named_parameters()]
    groups = group_parameters(model, model.group_matcher())
    assert sorted(sum(groups.values(), [])) == sorted(names)  # every parameter in a group
    group_of = {n: g for g, ns in groups.items() for n in ns}
    assert group_of['stem.0.conv.weight'] == group_of['pos_attn.dist_proj.weight'] == 0
    nwd = model.no_weight_decay()
    assert nwd and nwd <= set(names)
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    groups = _scale_of(opt, model)
    assert set(groups) == {n for n, _ in model.named_parameters()}  # every parameter exactly once
    depth = len(model.blocks)
    block_scale = []
    for i in range(depth):
        scales = {s for n, (s, _) in groups.items() if n.startswith((f'blocks.{i}.', f'pos_attn.blocks.{i}.'))}
        assert len(scales) == 1, f'block {i} and its position encoder must share one lr scale, got {scales}'
        block_scale.append(scales.pop())
    for a, b in zip(block_scale, block_scale[1:]):
        assert b == pytest.approx(a / 0.65)  # one layer-decay step per block
    stem = [s for n, (s, _) in groups.items() if n.startswith(('stem.', 'pos_attn.dist_proj.'))]
    assert stem == [pytest.approx(block_scale[0] * 0.65)] * len(stem)
    assert groups['head.weight'][0] == 1.0 and groups['norm.weight'][0] >= block_scale[-1]
    # weight decay: matrices and convs decay; biases, norms and the distance embedding (no_weight_decay) do not
    for name, (_, wd) in groups.items():
        param = model.get_parameter(name)
        exempt = param.ndim <= 1 or name in model.no_weight_decay()
        assert wd == (0.0 if exempt else 0.05), name
    assert groups['pos_attn.dist_proj.weight'][1] == 0.0
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    opt.step()


def test_channels_last_and_bf16_autocast():
    """train.py --channels-last and --amp --amp-dtype bfloat16 (torch.autocast on CPU)."""
    model = timm.create_model('pervit_tiny', num_classes=5, **MICRO_ARCH)
    x = torch.randn(4, 3, 64, 64)
    expected = fresh_eval(model, x)
    model = model.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(xc), expected, rtol=1e-5, atol=1e-5)
    model.train()
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(xc)
        loss = F.cross_entropy(out, torch.tensor([0, 1, 2, 3]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):  # eval under autocast: cached in bf16
        amp_out = model.eval()(xc)
    torch.testing.assert_close(amp_out.float(), fresh_eval(model, x), rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_torch_compile_training_step():
    """train.py --torchcompile: a compiled model trains like the eager one (aot_eager: inductor needs minutes here)."""
    model = timm.create_model('pervit_tiny', num_classes=5, **MICRO_ARCH).train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend='aot_eager')
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    for m in (compiled, eager):
        F.cross_entropy(m(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), fresh_eval(eager, x), rtol=1e-4, atol=1e-5)


def _train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, ema: ModelEmaV3 = None) -> None:
    model.train()
    for step in range(steps):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if ema is not None:
            ema.update(model, step=step + 1)


def test_model_ema_v3():
    """train.py --model-ema: ModelEmaV3 averages the weights; its copy's position-attention cache follows them."""
    model = timm.create_model('pervit_tiny', num_classes=5, **MICRO_ARCH)
    ema = ModelEmaV3(model, decay=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = ema.module(x)  # populates the EMA copy's cache
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-2)
    _train_steps(model, opt, 1)
    ema.update(model, step=10)  # train.py passes the update count; decay is 0.5 past the first step (no warmup)
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.5 * start[k] + 0.5 * model.state_dict()[k], msg=k)
    with torch.no_grad():
        after = ema.module(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh_eval(ema.module, x))


def test_checkpoint_saver_resume_and_initial_checkpoint(tmp_path):
    """A checkpoint written by timm's CheckpointSaver: --resume, --initial-checkpoint, validate.py --checkpoint."""
    model = timm.create_model('pervit_tiny', num_classes=5, **MICRO_ARCH)
    ema = ModelEmaV3(model, decay=0.9)
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    _train_steps(model, opt, 2, ema)
    args = argparse.Namespace(model='pervit_tiny', model_kwargs=MICRO_ARCH, num_classes=5)
    saver = CheckpointSaver(model, opt, args=args, model_ema=ema, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path), max_history=2)
    saver.save_checkpoint(epoch=3, metric=50.0)
    path = tmp_path / 'last.pth.tar'
    assert path.is_file()

    # --resume: model + optimizer state, next epoch
    resumed = timm.create_model('pervit_tiny', num_classes=5, **MICRO_ARCH)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        resumed.eval()(x)  # populate the cache with the initial weights: it must not survive the resume
    opt2 = create_optimizer_v2(resumed, opt='adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    assert resume_checkpoint(resumed, str(path), optimizer=opt2, log_info=False) == 4
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert opt2.state_dict()['state'].keys() == opt.state_dict()['state'].keys()
    with torch.no_grad():
        torch.testing.assert_close(resumed(x), fresh_eval(model, x))
    _train_steps(resumed, opt2, 1)  # training continues

    # --resume also restores the EMA (train.py: load_checkpoint(model_ema, args.resume, use_ema=True))
    ema2 = ModelEmaV3(timm.create_model('pervit_tiny', num_classes=5, **MICRO_ARCH))
    load_checkpoint(ema2.module, str(path), use_ema=True)
    for (n, a), b in zip(ema.module.state_dict().items(), ema2.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)

    # --initial-checkpoint: create_model(checkpoint_path=...) (EMA weights preferred, like validate.py --use-ema)
    init = train_py_create_model('pervit_tiny', num_classes=5, checkpoint_path=str(path), model_kwargs=MICRO_ARCH)
    with torch.no_grad():
        torch.testing.assert_close(init.eval()(x), fresh_eval(ema.module, x))
    # validate.py --checkpoint (no --use-ema): the raw weights
    val = train_py_create_model('pervit_tiny', num_classes=5, model_kwargs=MICRO_ARCH)
    load_checkpoint(val, str(path), use_ema=False)
    with torch.no_grad():
        torch.testing.assert_close(val.eval()(x), fresh_eval(model, x))


@pytest.mark.slow
def test_pretrained_path_official_checkpoint(pervit_tiny_official):
    """train.py --pretrained --pretrained-path <official PerViT .pth>: timm loads it through checkpoint_filter_fn."""
    path = str(pervit_tiny_official.path)
    same_head = train_py_create_model(
        'pervit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    for k, v in pervit_tiny_official.source_state_dict.items():
        torch.testing.assert_close(same_head.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # fine-tuning on another label set: train.py forces head adaptation (num_classes=-1 in the overlay)
    new_head = train_py_create_model(
        'pervit_tiny', pretrained=True, num_classes=10, drop_path_rate=0.1,
        pretrained_cfg_overlay=dict(file=path, num_classes=-1))
    assert new_head.num_classes == 10
    for k, v in pervit_tiny_official.source_state_dict.items():
        if not k.startswith('head.'):
            torch.testing.assert_close(new_head.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert new_head(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def _write_image_folder(root: Path, split: str, per_class: int, rng: np.random.Generator) -> None:
    """Three classes told apart by their dominant colour channel, with texture noise, 64x64 JPEGs."""
    for c, name in enumerate(('red', 'green', 'blue')):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (64, 64, 3))
            img[..., c] += 140
            Image.fromarray(img.astype(np.uint8)).save(folder / f'{i}.jpg', quality=95)


def _evaluate(model: torch.nn.Module, loader) -> Tuple[float, float]:
    """validate.py's loop: loss and top-1 through timm.utils.accuracy."""
    model.eval()
    losses: List[float] = []
    top1: List[float] = []
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            losses.append(F.cross_entropy(out, y).item() * len(y))
            top1.append(accuracy(out, y, topk=(1,))[0].item() * len(y))
    n = len(loader.dataset)
    return sum(losses) / n, sum(top1) / n


@pytest.mark.slow
def test_short_training_run_on_image_folder(tmp_path):
    """train.py's data path and loop: ImageFolder, recipe augmentations, mixup/cutmix, smoothing, cosine, validation."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    _write_image_folder(tmp_path, 'train', 16, rng)
    _write_image_folder(tmp_path, 'validation', 6, rng)
    num_classes, device = 3, torch.device('cpu')

    with set_layer_config(scriptable=False, exportable=False, no_jit=False):
        model = train_py_create_model(
            'pervit_tiny', num_classes=num_classes, drop_path_rate=0.1, model_kwargs=MICRO_ARCH)
    data_config = resolve_data_config(dict(input_size=(3, 64, 64)), model=model)
    train_set = create_dataset('', root=str(tmp_path), split='train', is_training=True, batch_size=12)
    val_set = create_dataset('', root=str(tmp_path), split='validation', is_training=False)
    assert len(train_set) == 48 and len(val_set) == 18
    # the recipe's RandAugment, or the one the recipe command advises where timm + Pillow 13 crash on it
    aa = 'rand-m9-mstd0.5-inc1' if augmentation_problem() is None else SAFE_AUGMENTATION
    collate = FastCollateMixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch',
                               label_smoothing=0.1, num_classes=num_classes)
    train_loader = create_loader(
        train_set, input_size=data_config['input_size'], batch_size=12, is_training=True, re_prob=0.25,
        re_mode='pixel', re_count=1, color_jitter=0.4, auto_augment=aa, interpolation='bicubic',
        mean=data_config['mean'], std=data_config['std'], num_workers=0, collate_fn=collate, device=device,
        use_prefetcher=True, persistent_workers=False)  # timm < 1.0.29 defaults to True (needs workers)
    val_loader = create_loader(
        val_set, input_size=data_config['input_size'], batch_size=6, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], num_workers=0, device=device, use_prefetcher=True, persistent_workers=False)

    optimizer = create_optimizer_v2(model, opt='adamw', lr=3e-3, weight_decay=0.05)
    epochs = 8
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=epochs, warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5,
        updates_per_epoch=len(train_loader))
    loss_fn = SoftTargetCrossEntropy()
    val_loss0, _ = _evaluate(model, val_loader)
    epoch_losses, lrs = [], []
    for epoch in range(num_epochs):
        model.train()
        total = 0.
        for i, (x, target) in enumerate(train_loader):
            assert target.shape == (x.shape[0], num_classes)  # soft, mixed, smoothed targets
            loss = loss_fn(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step_update(num_updates=epoch * len(train_loader) + i + 1)
            total += loss.item()
        scheduler.step(epoch + 1)
        lrs.append(optimizer.param_groups[0]['lr'])
        epoch_losses.append(total / len(train_loader))
    val_loss, top1 = _evaluate(model, val_loader)
    assert lrs[-1] < max(lrs)  # cosine decay after warmup
    assert epoch_losses[-1] < epoch_losses[0]
    assert val_loss < val_loss0
    assert top1 > 100. / num_classes  # better than chance on held-out images
