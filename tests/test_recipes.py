"""The paper's training recipes: train.py option names only, the paper's values, findable from the CLI."""
import subprocess
import sys

import pytest
import timm
import yaml

from timm_pervit.recipes import RECIPE_VARIANTS, load_recipe, recipe_path, train_command
from timm_pervit.recipes import main as recipe_main

#: The option names (argparse ``dest``) of timm's train.py that the recipes rely on. train.py applies a config file
#: with ``parser.set_defaults(**yaml.safe_load(f))``, so a key outside train.py's options would be silently ignored.
TRAIN_PY_OPTIONS = {
    'model', 'batch_size', 'epochs', 'opt', 'opt_eps', 'weight_decay', 'lr_base', 'lr_base_size', 'lr_base_scale',
    'sched', 'warmup_epochs', 'warmup_lr', 'min_lr', 'cooldown_epochs', 'drop_path', 'aa', 'color_jitter',
    'train_interpolation', 'reprob', 'remode', 'recount', 'mixup', 'cutmix', 'mixup_prob', 'mixup_switch_prob',
    'mixup_mode', 'smoothing', 'aug_repeats', 'model_ema',
}

#: Per-variant values of the paper: weight decay, warmup epochs, drop path.
PAPER = {
    'pervit_tiny': dict(weight_decay=0.03, warmup_epochs=5, drop_path=0.0),
    'pervit_small': dict(weight_decay=0.05, warmup_epochs=5, drop_path=0.1),
    'pervit_medium': dict(weight_decay=0.05, warmup_epochs=20, drop_path=0.2),
}


def train_py_lr(cfg: dict, world_size: int) -> float:
    """train.py's learning rate when ``--lr`` is not given: lr_base scaled by the global batch (train.py's rule)."""
    assert 'lr' not in cfg, 'a fixed lr would override the batch scaling'
    ratio = cfg['batch_size'] * world_size / cfg['lr_base_size']
    return cfg['lr_base'] * (ratio ** 0.5 if cfg['lr_base_scale'] == 'sqrt' else ratio)


@pytest.mark.parametrize('variant', RECIPE_VARIANTS)
def test_recipe_matches_paper(variant):
    cfg = load_recipe(variant)
    unknown = set(cfg) - TRAIN_PY_OPTIONS
    assert not unknown, f'not train.py options: {unknown}'
    assert cfg['model'] == variant and variant in timm.list_models('pervit*')
    # DeiT-style: 300 epochs, total batch 1024 = 8 x 128, AdamW lr 5e-4 x batch / 512
    assert cfg['epochs'] == 300 and cfg['cooldown_epochs'] == 10
    assert cfg['batch_size'] == 128 and cfg['opt'] == 'adamw'
    assert train_py_lr(cfg, world_size=8) == pytest.approx(5e-4 * 1024 / 512)
    assert train_py_lr(cfg, world_size=4) == pytest.approx(5e-4 * 512 / 512)  # linear, not train.py's sqrt for adam
    assert cfg['sched'] == 'cosine' and cfg['warmup_lr'] == pytest.approx(1e-6) and cfg['min_lr'] == pytest.approx(1e-5)
    for key, value in PAPER[variant].items():
        assert cfg[key] == pytest.approx(value), key
    assert cfg['aa'] == 'rand-m9-mstd0.5-inc1' and cfg['color_jitter'] == pytest.approx(0.4)
    assert cfg['train_interpolation'] == 'bicubic'
    assert cfg['reprob'] == pytest.approx(0.25) and cfg['remode'] == 'pixel'
    assert cfg['mixup'] == pytest.approx(0.8) and cfg['cutmix'] == pytest.approx(1.0)
    assert cfg['smoothing'] == pytest.approx(0.1) and cfg['aug_repeats'] == 3 and cfg['model_ema'] is False
    # every value has the type train.py's argparse would produce
    assert all(isinstance(cfg[k], float) for k in ('weight_decay', 'lr_base', 'warmup_lr', 'min_lr', 'drop_path'))


def test_recipe_values_work_with_timm():
    """The augmentation strings and the schedule are accepted by the timm functions train.py hands them to."""
    import torch
    from timm.data import create_transform
    from timm.scheduler import create_scheduler_v2

    cfg = load_recipe('pervit_small')
    tf = create_transform(
        224, is_training=True, auto_augment=cfg['aa'], color_jitter=cfg['color_jitter'],
        interpolation=cfg['train_interpolation'], re_prob=cfg['reprob'], re_mode=cfg['remode'],
        re_count=cfg['recount'])
    assert 'RandAugment' in repr(tf) and 'RandomErasing' in repr(tf)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched, num_epochs = create_scheduler_v2(
        opt, sched=cfg['sched'], num_epochs=cfg['epochs'], warmup_epochs=cfg['warmup_epochs'],
        warmup_lr=cfg['warmup_lr'], min_lr=cfg['min_lr'], cooldown_epochs=cfg['cooldown_epochs'])
    assert num_epochs == cfg['epochs'] + cfg['cooldown_epochs']
    assert sched._get_lr(0)[0] == pytest.approx(cfg['warmup_lr'])
    assert sched._get_lr(cfg['epochs'])[0] == pytest.approx(cfg['min_lr'])


def test_recipe_files_are_package_data():
    for variant in RECIPE_VARIANTS:
        path = recipe_path(variant)
        assert path.parent.name == 'recipes' and path.name == f'{variant}.yaml'
        assert yaml.safe_load(path.read_text()) == load_recipe(variant)
    with pytest.raises(ValueError, match='pervit_tiny'):
        recipe_path('pervit_huge')


def test_recipe_cli(capsys):
    assert recipe_main(['pervit_small', '--path']) == 0
    assert capsys.readouterr().out.strip() == str(recipe_path('pervit_small'))
    assert recipe_main(['pervit_medium', '--nproc-per-node', '4']) == 0
    out = capsys.readouterr().out
    assert train_command('pervit_medium', 4) in out and '--nproc_per_node=4' in out


def test_recipe_cli_subprocess(tmp_path):
    """`python -m timm_pervit recipe pervit_tiny --path` from the installed package, as in the README."""
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_pervit', 'recipe', 'pervit_tiny', '--path'],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(recipe_path('pervit_tiny'))
