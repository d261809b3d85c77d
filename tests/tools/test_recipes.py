"""The paper's training recipes: train.py option names only, the paper's values, findable from the CLI."""
import argparse
import fnmatch
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm

from timm_pervit.tools.recipes import RECIPE_VARIANTS, load_recipe, recipe_path, train_command
from timm_pervit.tools.recipes import main as recipe_main

from tests.conftest import REPO


#: The train.py options the recipes use: argparse ``dest`` -> the ``type`` train.py parses it with (``bool``: a
#: ``store_true`` flag). train.py applies a config file with ``parser.set_defaults(**yaml.safe_load(f))``, so a key
#: outside its options does not take effect. timm ships train.py in neither its wheel nor its sdist, so the table is
#: written out here (taken from train.py's ``add_argument`` calls); test_recipe_reaches_timm_train_py_readers checks
#: the optimizer and schedule names against the timm functions that read train.py's parsed arguments.
TRAIN_PY_OPTIONS = {
    'model': str, 'batch_size': int, 'epochs': int, 'opt': str, 'opt_eps': float, 'weight_decay': float,
    'lr_base': float, 'lr_base_size': int, 'lr_base_scale': str, 'sched': str, 'warmup_epochs': int,
    'warmup_lr': float, 'min_lr': float, 'cooldown_epochs': int, 'drop_path': float, 'aa': str, 'color_jitter': float,
    'train_interpolation': str, 'reprob': float, 'remode': str, 'recount': int, 'mixup': float, 'cutmix': float,
    'mixup_prob': float, 'mixup_switch_prob': float, 'mixup_mode': str, 'smoothing': float, 'aug_repeats': float,
    'model_ema': bool,
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


def _parses_as_train_py_would(value: Any, type_: type) -> bool:
    """Whether ``value`` (from the YAML file) is what train.py's argparse ``type_`` makes of its command-line text."""
    if type_ is bool:
        return isinstance(value, bool)
    return not isinstance(value, bool) and type_(str(value)) == value


@pytest.mark.parametrize('variant', RECIPE_VARIANTS)
def test_recipe_matches_paper(variant):
    cfg = load_recipe(variant)
    unknown = set(cfg) - set(TRAIN_PY_OPTIONS)
    assert not unknown, f'not train.py options: {unknown}'
    # every value has the type train.py's argparse would produce (YAML 1.1 reads e.g. `1e-8` as a string)
    mistyped = {k: v for k, v in cfg.items() if not _parses_as_train_py_would(v, TRAIN_PY_OPTIONS[k])}
    assert not mistyped, f'values train.py would parse differently: {mistyped}'
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


@pytest.mark.parametrize('variant', RECIPE_VARIANTS)
def test_recipe_reaches_timm_train_py_readers(variant):
    """timm's ``optimizer_kwargs`` / ``scheduler_kwargs`` turn train.py's parsed arguments into factory arguments, by
    train.py's dest names (with defaults for the ones they do not find): they return the recipe's values, and the
    recipe keys they read are the table's."""
    from timm.optim import optimizer_kwargs
    from timm.scheduler import scheduler_kwargs

    cfg = load_recipe(variant)
    read = set()

    class RecordingArgs(argparse.Namespace):
        def __getattribute__(self, name: str) -> Any:
            if not name.startswith('_'):
                read.add(name)
            return super().__getattribute__(name)

    lr = train_py_lr(cfg, world_size=8)
    args = RecordingArgs(**cfg, lr=lr, momentum=0.9)  # train.py sets lr from lr_base; momentum is its default
    opt = optimizer_kwargs(args)
    assert (opt['opt'], opt['eps'], opt['weight_decay'], opt['lr']) == \
        (cfg['opt'], cfg['opt_eps'], cfg['weight_decay'], lr)
    sched = scheduler_kwargs(args)
    assert sched['sched'] == cfg['sched'] and sched['num_epochs'] == cfg['epochs']
    assert (sched['warmup_epochs'], sched['warmup_lr'], sched['min_lr'], sched['cooldown_epochs']) == \
        (cfg['warmup_epochs'], cfg['warmup_lr'], cfg['min_lr'], cfg['cooldown_epochs'])
    assert sched['step_on_epochs']  # the paper's schedule steps per epoch (no sched_on_updates in the recipe)
    used = read & set(cfg)
    assert used == {'opt', 'opt_eps', 'weight_decay', 'sched', 'epochs', 'warmup_epochs', 'warmup_lr', 'min_lr',
                    'cooldown_epochs'}
    assert used <= set(TRAIN_PY_OPTIONS)


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
    """Each variant's recipe is a file of the ``timm_pervit.tools.recipes`` package matched by pyproject.toml's
    package-data patterns (so wheels ship it), and the package holds no other recipe."""
    from setuptools.config.pyprojecttoml import load_file

    import timm_pervit.tools.recipes

    package_dir = Path(timm_pervit.tools.recipes.__file__).parent
    patterns = load_file(REPO / 'pyproject.toml')['tool']['setuptools']['package-data']['timm_pervit.tools.recipes']
    for variant in RECIPE_VARIANTS:
        path = recipe_path(variant)
        assert path == package_dir / f'{variant}.yaml' and path.is_file()
        assert any(fnmatch.fnmatch(path.name, p) for p in patterns), f'{path.name} not in the package data'
    assert sorted(p.stem for p in package_dir.glob('*.yaml')) == sorted(RECIPE_VARIANTS)
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


def test_recipe_cli_warns_when_the_recipe_augmentation_would_crash(capsys):
    """Pillow 13 rejects the 0-bit posterize that timm's ``inc1`` RandAugment reaches at magnitude 10: the recipe
    command says so (on stderr, naming the fix) exactly when the installed timm + Pillow pair fails that way."""
    from PIL import Image
    from timm.data import auto_augment
    from timm_pervit.tools.recipes import augmentation_problem
    op = auto_augment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)  # what the recipe reaches, clipped
    image = Image.new('RGB', (8, 8), (200, 100, 50))
    try:
        op(image)
        crashes = False
    except ValueError:
        crashes = True
    problem = augmentation_problem()
    assert (problem is not None) == crashes
    assert recipe_main(['pervit_tiny', '--path']) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(recipe_path('pervit_tiny'))  # $(... --path) stays usable either way
    if crashes:
        assert 'pillow<13' in captured.err and '--aa rand-m9-mstd0.5' in captured.err
        # the suggested augmentation does not reach the failing posterize
        safe = auto_augment.AugmentOp('Posterize', prob=1.0, magnitude=10)
        safe(image)
    else:
        assert 'warning' not in captured.err
