"""The paper's ImageNet-1k training recipes, as config files for timm's ``train.py``.

One YAML per variant (``pervit_tiny.yaml``, ``pervit_small.yaml``, ``pervit_medium.yaml``) ships inside this package;
its keys are ``train.py``'s option names (argparse ``dest``), so ``train.py -c <yaml>`` (timm's ``--config``) sets
them as defaults and any command-line flag still overrides them. The recipe is the paper's DeiT-style one: 300
epochs (+10 cooldown), total batch 1024 (8 x 128), AdamW with lr 5e-4 x batch / 512, cosine schedule, RandAugment,
mixup/cutmix, random erasing, label smoothing, repeated augmentation, no EMA.

``python -m timm_pervit recipe pervit_small`` prints the path and the command lines; ``--path`` only the path, for
``train.py -c $(python -m timm_pervit recipe pervit_small --path)``.
"""
import argparse
import shlex
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = [
    'RECIPE_VARIANTS', 'SAFE_AUGMENTATION', 'recipe_path', 'load_recipe', 'train_command', 'augmentation_problem',
    'main']

#: Variants with a recipe.
RECIPE_VARIANTS = ('pervit_tiny', 'pervit_small', 'pervit_medium')

#: RandAugment without the increasing posterize (it keeps 4 to 8 bits): the ``--aa`` to use where
#: ``augmentation_problem`` reports that the recipe's own one crashes.
SAFE_AUGMENTATION = 'rand-m9-mstd0.5'


def recipe_path(variant: str) -> Path:
    """Path of the installed train.py config of ``variant``.

    Raises:
        ValueError: For a name without a recipe, listing the available ones.
    """
    if variant not in RECIPE_VARIANTS:
        raise ValueError(f'no training recipe for {variant!r}; available: {", ".join(RECIPE_VARIANTS)}')
    path = Path(str(resources.files(__name__).joinpath(f'{variant}.yaml')))
    if not path.is_file():
        raise FileNotFoundError(f'recipe file {path} is missing from the installation; reinstall timm-pervit')
    return path


def load_recipe(variant: str) -> Dict[str, Any]:
    """The recipe of ``variant`` as a dict of train.py options (needs PyYAML, which train.py needs as well)."""
    try:
        import yaml
    except ImportError as e:
        raise ImportError('reading a recipe needs PyYAML: pip install pyyaml') from e
    with open(recipe_path(variant), encoding='utf-8') as f:
        return yaml.safe_load(f)


def train_command(variant: str, nproc_per_node: int = 8, data_dir: str = '/imagenet') -> str:
    """The ``torchrun`` command line that trains ``variant`` with its recipe (run from a timm repository checkout)."""
    return (f'torchrun --nproc_per_node={nproc_per_node} train.py -c {shlex.quote(str(recipe_path(variant)))} '
            f'--data-dir {shlex.quote(data_dir)}')


def augmentation_problem() -> Optional[str]:
    """Why the recipe's RandAugment would crash train.py with the installed timm and Pillow, or None if it will not.

    The recipe's ``rand-m9-mstd0.5-inc1`` samples magnitudes around 9 and clips them at 10, where timm's increasing
    posterize keeps 0 bits. Pillow 13 rejects 0 bits (``ValueError: bits must be between or equal to 1 and 8``) and
    timm passes them on (every release up to at least 1.0.31), so a run dies at a random step, usually within the
    first epoch. The check calls timm's own posterize op with 0 bits on a one-pixel image.
    """
    try:
        from PIL import Image
        from timm.data import auto_augment
    except ImportError:
        return None
    try:
        auto_augment.posterize(Image.new('RGB', (1, 1)), 0)
    except ValueError as e:
        import PIL
        return (f"the recipe's RandAugment (rand-m9-mstd0.5-inc1) fails with this timm and Pillow {PIL.__version__}: "
                f'timm posterizes to 0 bits, which Pillow rejects ({e}). Fix: pip install "pillow<13", or pass '
                f'--aa {SAFE_AUGMENTATION} to train.py (posterize keeps 4 to 8 bits; not the paper\'s augmentation)')
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m timm_pervit recipe <variant> [--path]``: where the recipe is and how to train with it."""
    parser = argparse.ArgumentParser(
        prog='python -m timm_pervit recipe',
        description="Print the path of the paper's train.py recipe for a PerViT variant and the command to use it.",
    )
    parser.add_argument('variant', choices=RECIPE_VARIANTS, help='model name')
    parser.add_argument('--path', action='store_true', help='print only the path (for train.py -c $(...))')
    parser.add_argument('--nproc-per-node', type=int, default=8, help='processes (GPUs) per node in the command')
    parser.add_argument('--data-dir', default='/imagenet', help='ImageNet folder in the command')
    args = parser.parse_args(argv)
    path = recipe_path(args.variant)
    problem = augmentation_problem()
    if problem:
        print(f'warning: {problem}', file=sys.stderr)  # stderr: train.py -c $(... --path) still gets the path
    if args.path:
        print(path)
        return 0
    print(f'recipe: {path}')
    print(f'train:    {train_command(args.variant, args.nproc_per_node, args.data_dir)}')
    print(f'validate: python validate.py --model {args.variant} --pretrained --data-dir {shlex.quote(args.data_dir)}')
    print('(run from a checkout of https://github.com/huggingface/pytorch-image-models; total batch = nproc x 128, '
          'lr scales with it; the recipe uses --aug-repeats 3, which needs a distributed run)')
    return 0
