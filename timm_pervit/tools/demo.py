"""``python -m timm_pervit demo``: an offline end-to-end PerViT demo on real data, CPU friendly.

1. prints the PerViT family table (params, GMACs at 224 px, measured img/s here, paper top-1, pretrained tag);
2. trains ``pervit_tiny`` from scratch (peripheral initialization) on scikit-learn's bundled handwritten digits
   (1,797 real 8x8 scans, upsampled to ``--img-size`` px, 3 channels; a stratified 20% held-out split) with timm's
   optimizer, scheduler, loss and augmentation factories, with a progress bar on a terminal (plain progress lines
   in a log file);
3. saves it as a hub-ready folder (model.safetensors + a config.json describing the digits weights, written by
   ``timm_pervit.tools.model_card.save_for_hf``), reloads it through timm's pretrained path
   (``timm.create_model('local-dir:<folder>', pretrained=True)``) and, when the repository's ``hubconf.py`` is
   present, through ``torch.hub.load(<repo>, ..., source='local')``, and checks the predictions are identical;
4. writes a PNG grid of held-out predictions (image, true label, top-3);
5. writes the learned position-attention figures (``timm_pervit.tools.visualize``), compared with the initialization;
6. prints where every output file is (also listed in ``summary.json``).

Needs the ``demo`` extra: ``pip install "timm-pervit[demo]"`` (matplotlib, scikit-learn, tqdm; without tqdm the
progress is plain lines on a terminal too).
"""
import argparse
import functools
import json
import logging
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .._compat import create_model_from_folder
from .progress import Progress, add_progress_arguments

__all__ = ['load_digits_split', 'family_table', 'choose_threads', 'train', 'evaluate', 'run_demo', 'main']

_logger = logging.getLogger(__name__)

#: Normalization of the digit images (ink in [0, 1] -> [-1, 1]); saved in the exported config.
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
NUM_CLASSES = 10


def _require(module: str, package: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(
            f'the demo needs {package}: pip install "timm-pervit[demo]" (matplotlib, scikit-learn, tqdm)') from e


def load_digits_split(
        img_size: int = 64,
        test_fraction: float = 0.2,
        seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits, split (stratified) and upsampled to ``img_size``, normalized, 1 channel.

    Returns:
        (x_train, y_train, x_test, y_test, raw_test): images (N, 1, img_size, img_size) normalized to [-1, 1],
        int64 labels, and the original 8x8 held-out images in [0, 1] (for display).
    """
    _require('sklearn', 'scikit-learn')
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # shipped inside scikit-learn: no download
    raw = torch.tensor(digits.images, dtype=torch.float32) / 16.
    labels = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        list(range(len(labels))), test_size=test_fraction, stratify=digits.target, random_state=seed)

    def prep(idx: List[int]) -> torch.Tensor:
        x = F.interpolate(raw[idx].unsqueeze(1), size=(img_size, img_size), mode='bilinear', align_corners=False)
        return (x - DIGITS_MEAN[0]) / DIGITS_STD[0]

    return prep(idx_train), labels[idx_train], prep(idx_test), labels[idx_test], raw[idx_test]


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Logits of ``model`` (put in eval mode) for 1-channel images ``x``, batched."""
    model.eval()
    return torch.cat([model(_rgb(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def _img_per_s(model: torch.nn.Module, img_size: int, batch_size: int, min_time: float) -> float:
    x = torch.randn(batch_size, 3, img_size, img_size)
    with torch.no_grad():
        model(x)  # warm-up
        n, t0 = 0, time.perf_counter()
        while True:
            model(x)
            n += batch_size
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                return n / elapsed


def family_table(img_size: int = 224, batch_size: int = 4, min_time: float = 1.0) -> List[Dict[str, Any]]:
    """Params, GMACs (``timm_pervit.count_gmacs``: eval, attention included) and inference img/s per variant."""
    import timm
    from ..paper import PAPER_RESULTS
    from ..pervit import PERVIT_VARIANTS
    from .flops import count_gmacs

    rows = []
    for name in PERVIT_VARIANTS:
        model = timm.create_model(name).eval()
        rows.append(dict(
            variant=name,
            params=sum(p.numel() for p in model.parameters()),
            gmacs=count_gmacs(model, (3, img_size, img_size)),
            img_per_s=_img_per_s(model, img_size, batch_size, min_time),
            paper_top1=PAPER_RESULTS[name][0],
            tag=f'{name}.{model.pretrained_cfg.get("tag", "")}',
            hf_hub_id=model.pretrained_cfg.get('hf_hub_id', ''),
        ))
    return rows


def _augment(x: torch.Tensor, crop: Any, background: float) -> torch.Tensor:
    """Random resized crops of the (background-padded) digits, resized back: small shifts and scale changes."""
    if crop is None:
        return x
    return torch.stack([crop(F.pad(img, (2, 2, 2, 2), value=background)) for img in x])


def _augmenter(x_train: torch.Tensor, crop_scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training augmentation for images like ``x_train``: timm's random resized crop (area ``crop_scale``..1 of
    the padded image, per image), or none when ``crop_scale`` is 1."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    size = x_train.shape[-1]
    crop = RandomResizedCropAndInterpolation(size, scale=(crop_scale, 1.), ratio=(0.85, 1.15)) \
        if crop_scale < 1 else None
    return functools.partial(_augment, crop=crop, background=float(x_train.min()))


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def _seconds_per_epoch(
        model: torch.nn.Module,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        n_eval: int,
        batch_size: int,
        augment: Callable[[torch.Tensor], torch.Tensor],
        steps: int = 3,
) -> float:
    """Time a few training steps (and an evaluation batch) on a throw-away copy of the model: seconds per epoch."""
    import copy
    from timm.optim import create_optimizer_v2

    probe = copy.deepcopy(model).train()
    optimizer = create_optimizer_v2(probe, opt='adamw', lr=1e-6)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        x = _rgb(augment(x_train[i * batch_size:(i + 1) * batch_size]))
        loss = F.cross_entropy(probe(x), y_train[i * batch_size:(i + 1) * batch_size])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    step_s = sorted(times[1:])[len(times[1:]) // 2] if steps > 1 else times[0]  # skip the warm-up step
    t = time.perf_counter()
    evaluate(probe, x_train[:min(128, len(x_train))])
    eval_s = (time.perf_counter() - t) * math.ceil(n_eval / 128)
    return step_s * math.ceil(len(x_train) / batch_size) + eval_s


def _epochs_for_budget(
        model: torch.nn.Module,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        n_eval: int,
        batch_size: int,
        augment: Callable[[torch.Tensor], torch.Tensor],
        time_budget: float,
        max_epochs: int,
        started: float,
        log: Callable[[str], None],
) -> int:
    """Epochs (1..``max_epochs``) that fit what is left of ``time_budget`` seconds since ``started``, at the speed
    measured on a throw-away copy of the model."""
    epoch_s = _seconds_per_epoch(model, x_train, y_train, n_eval, batch_size, augment)
    epochs = int(max(1, min(max_epochs, (time_budget - (time.perf_counter() - started)) // epoch_s)))
    log(f'measured ~{epoch_s:.1f} s per epoch here ({torch.get_num_threads()} thread(s)): {epochs} epochs fit the '
        f'{time_budget:g} s budget')
    return epochs


class _StepRecipe(NamedTuple):
    """What a training step applies besides the model: augmentation, mixup, loss, optimizer, per-step schedule."""
    augment: Callable[[torch.Tensor], torch.Tensor]
    mixer: Optional[Any]
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


def _step_recipe(
        model: torch.nn.Module,
        augment: Callable[[torch.Tensor], torch.Tensor],
        epochs: int,
        updates_per_epoch: int,
        lr: float,
        weight_decay: float,
        smoothing: float,
        mixup: float,
) -> _StepRecipe:
    """timm's AdamW, cosine schedule stepped per update (one warm-up epoch from lr/100 when there are >= 3 epochs,
    decay to lr/100), Mixup when ``mixup > 0`` (then the loss takes its soft targets), label smoothing."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(model, opt='adamw', lr=lr, weight_decay=weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=epochs, warmup_epochs=1 if epochs >= 3 else 0, warmup_lr=lr / 100,
        min_lr=lr / 100, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    mixer = Mixup(mixup_alpha=mixup, label_smoothing=smoothing, num_classes=NUM_CLASSES) if mixup > 0 else None
    criterion = SoftTargetCrossEntropy() if mixer else LabelSmoothingCrossEntropy(smoothing=smoothing)
    return _StepRecipe(augment, mixer, criterion, optimizer, scheduler)


def _train_epoch(
        model: torch.nn.Module,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        batch_size: int,
        recipe: _StepRecipe,
        step: int,
        max_steps: Optional[int],
        bar: Progress,
        epoch: int,
) -> Tuple[List[float], int, bool]:
    """One pass over a random permutation of the training set.

    Returns:
        (the loss of every step, the optimizer steps taken so far, whether ``max_steps`` stopped the pass).
    """
    model.train()
    n = len(x_train)
    perm = torch.randperm(n)
    losses = []
    for i in range(0, n, batch_size):
        idx = perm[i:i + batch_size]
        if len(idx) < 2:  # training-mode BatchNorm needs two samples
            continue
        x, y = _rgb(recipe.augment(x_train[idx])), y_train[idx]
        if recipe.mixer is not None:
            # timm's Mixup mixes the batch in place: the 3-channel view of the 1-channel images needs its own memory
            x, y = recipe.mixer(x.contiguous(), y)
        loss = recipe.criterion(model(x), y)
        recipe.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        recipe.optimizer.step()
        step += 1
        recipe.scheduler.step_update(num_updates=step)
        losses.append(loss.item())
        bar.update(1, epoch=epoch + 1, loss=f'{loss.item():.3f}', lr=f'{recipe.optimizer.param_groups[0]["lr"]:.1e}')
        if max_steps is not None and step >= max_steps:
            return losses, step, True
    return losses, step, False


def choose_threads(model: torch.nn.Module, img_size: int, batch_size: int = 32, repeats: int = 2) -> Dict[int, float]:
    """Set torch's intra-op threads to the faster of all threads and one thread for ``model`` at ``img_size``.

    On a CPU shared with other work, threads that wait on each other can make every step many times slower than one
    thread does; on an idle machine all threads win. Times ``repeats`` inference forwards (no state changes) each.

    Returns:
        Seconds per forward for each thread count tried.
    """
    x = torch.zeros(batch_size, 3, img_size, img_size)
    was_training = model.training
    model.eval()
    timings = {}
    with torch.no_grad():
        for threads in dict.fromkeys((torch.get_num_threads(), 1)):
            torch.set_num_threads(threads)
            model(x)  # warm-up
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t)
            timings[threads] = min(times)
    torch.set_num_threads(min(timings, key=timings.get))
    model.train(was_training)
    return timings


def train(
        model: torch.nn.Module,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_test: Optional[torch.Tensor] = None,
        y_test: Optional[torch.Tensor] = None,
        epochs: Optional[int] = None,
        time_budget: float = 200.,
        max_epochs: int = 15,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        smoothing: float = 0.1,
        crop_scale: float = 0.85,
        mixup: float = 0.,
        max_steps: Optional[int] = None,
        progress: Union[bool, str] = True,
        log: Callable[[str], None] = _logger.info,
) -> Dict[str, Any]:
    """Train with timm's AdamW, cosine-with-warmup schedule (per step), label-smoothing loss and augmentation.

    The schedule (one warm-up epoch from lr/100 when there are >= 3, cosine decay to lr/100 per step) spans
    ``epochs`` epochs; when ``epochs``
    is None it is sized to fit ``time_budget`` seconds on this machine (at most ``max_epochs``) from the measured
    speed of a few training steps on a throw-away copy of the model. Augmentation: timm's
    ``RandomResizedCropAndInterpolation`` (area ``crop_scale``..1 of the padded image, per image) and, if
    ``mixup > 0``, timm's ``Mixup`` (then the loss is ``SoftTargetCrossEntropy``).

    Args:
        model: Model to train (in place).
        x_train: Normalized 1-channel images (N, 1, S, S).
        y_train: Labels (N,).
        x_test: Held-out images, evaluated after every epoch when given.
        y_test: Held-out labels.
        epochs: Epochs of the schedule; None: as many as fit ``time_budget``.
        time_budget: Seconds of training (with the per-epoch evaluation) to size the schedule for.
        max_epochs: Upper bound on the epochs chosen from ``time_budget``.
        batch_size: Batch size.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        smoothing: Label smoothing.
        crop_scale: Smallest crop area fraction of the random-resized-crop augmentation (1 disables it).
        mixup: Mixup alpha (0 disables it).
        max_steps: Stop after this many optimizer steps (for quick runs; the schedule is not shortened).
        progress: A tqdm progress bar on a terminal, a plain progress line at every tenth of the steps otherwise
            (True / 'auto'); or always 'bar', 'log', or none (False / 'off').
        log: Where progress lines go (default: this module's logger; the CLI prints them).

    Returns:
        Dict with 'epochs', 'step_losses', 'epoch_losses', 'epoch_acc' (held-out top-1 per epoch), 'steps',
        'seconds' (wall, including the speed measurement), 'cpu_seconds' (CPU time of this process), 'stopped_early'.
    """
    t0 = time.perf_counter()
    c0 = time.process_time()
    updates_per_epoch = math.ceil(len(x_train) / batch_size)
    augment = _augmenter(x_train, crop_scale)
    if epochs is None:
        n_eval = len(x_test) if x_test is not None else 0
        epochs = _epochs_for_budget(
            model, x_train, y_train, n_eval, batch_size, augment, time_budget, max_epochs, t0, log)
    recipe = _step_recipe(model, augment, epochs, updates_per_epoch, lr, weight_decay, smoothing, mixup)

    total_updates = epochs * updates_per_epoch
    total = total_updates if max_steps is None else min(max_steps, total_updates)
    result: Dict[str, Any] = dict(epochs=epochs, step_losses=[], epoch_losses=[], epoch_acc=[], stopped_early=False)
    step = 0
    bar = Progress(total, 'train', progress, log=log, dynamic_ncols=True)
    for epoch in range(epochs):
        losses, step, stopped = _train_epoch(model, x_train, y_train, batch_size, recipe, step, max_steps, bar, epoch)
        result['step_losses'].extend(losses)
        result['epoch_losses'].append(sum(losses) / max(len(losses), 1))
        if x_test is not None and y_test is not None:
            acc = _top1(evaluate(model, x_test), y_test)
            result['epoch_acc'].append(acc)
            line = (f'epoch {epoch + 1}/{epochs}: train loss {result["epoch_losses"][-1]:.4f}, '
                    f'held-out top-1 {100 * acc:.2f}% ({time.perf_counter() - t0:.0f} s)')
            bar.write(line)  # above the progress bar, if there is one
        if stopped:
            result['stopped_early'] = True
            break
    bar.close()
    result['steps'] = step
    result['seconds'] = time.perf_counter() - t0
    result['cpu_seconds'] = time.process_time() - c0
    result['threads'] = torch.get_num_threads()
    model.eval()
    return result


def _plot_predictions(
        raw: torch.Tensor,
        y_true: torch.Tensor,
        probs: torch.Tensor,
        path: Path,
        num: int = 16,
) -> None:
    """PNG grid of held-out digits with true label and top-3 predictions (misclassified ones first, in red)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    pred = probs.argmax(-1)
    wrong = torch.nonzero(pred != y_true).flatten().tolist()
    right = torch.nonzero(pred == y_true).flatten().tolist()
    chosen = (wrong[:num // 4] + right)[:num]
    cols = 4
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.4), squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    for ax, i in zip(axes.flat, chosen):
        top_p, top_c = probs[i].topk(3)
        ax.imshow(raw[i].numpy(), cmap='gray_r', vmin=0, vmax=1, interpolation='nearest')
        ok = int(top_c[0]) == int(y_true[i])
        ax.set_title(
            f'true {int(y_true[i])}\n' + ', '.join(f'{int(c)}: {100 * float(p):.0f}%' for p, c in zip(top_p, top_c)),
            fontsize=8, color='black' if ok else 'red')
    fig.suptitle('Held-out digits: true label, top-3 predictions (misclassified in red)', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _check_output_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise PermissionError(
            f'output directory {str(path)!r} is not writable ({e.strerror or e}); pass --output-dir with a writable '
            f'folder') from e
    return path


def _repo_root() -> Optional[Path]:
    root = Path(__file__).resolve().parents[2]  # timm_pervit/tools/demo.py -> the repository
    return root if (root / 'hubconf.py').is_file() else None


def _check_request(model_name: str, checkpoint: Optional[str]) -> None:
    """Fail early, naming the fix: a missing extra, an unknown variant, a checkpoint folder that is not there."""
    from ..pervit import PERVIT_VARIANTS
    from .visualize import _require_matplotlib

    _require('sklearn', 'scikit-learn')
    _require_matplotlib()
    if model_name not in PERVIT_VARIANTS:
        raise ValueError(f'unknown model {model_name!r}: choose one of {", ".join(PERVIT_VARIANTS)}')
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise FileNotFoundError(
            f'checkpoint folder {checkpoint!r} does not exist: pass a folder written by this demo (config.json + '
            f'model.safetensors), or leave --checkpoint out to train')


def _set_threads(model: torch.nn.Module, img_size: int, threads: Optional[int], log: Callable[[str], None]) -> int:
    """Use ``threads`` intra-op threads, or the faster of all and one (``choose_threads``) when None."""
    if threads is None:
        timings = choose_threads(model, img_size)
        log(f'threads: {torch.get_num_threads()} (a forward took ' + ', '.join(
            f'{v:.2f} s with {t}' for t, v in timings.items()) + '; on a shared CPU one thread can be far faster)')
    else:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _log_family_table(img_size: int, log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """The PerViT family table (``family_table``), logged; returns its rows."""
    log(f'PerViT family on this machine ({torch.get_num_threads()} thread(s), batch 4, {img_size} px):')
    rows = family_table(img_size)
    log(f'{"variant":<15}{"params":>12}{"GMACs@" + str(img_size):>11}{"img/s":>9}{"paper top-1":>13}  '
        f'pretrained tag (hub id)')
    for r in rows:
        log(f'{r["variant"]:<15}{r["params"]:>12,}{r["gmacs"]:>11.3f}{r["img_per_s"]:>9.1f}'
            f'{r["paper_top1"]:>12.1f}%  {r["tag"]} ({r["hf_hub_id"]})')
    return rows


def _load_data(
        img_size: int,
        seed: int,
        log: Callable[[str], None],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits split (``load_digits_split``), logged."""
    data = load_digits_split(img_size, seed=seed)
    log(f'\ndata: scikit-learn digits, {len(data[0])} train / {len(data[2])} held-out images, 8x8 -> '
        f'{img_size}x{img_size} px, 3 channels')
    return data


def _train_from_scratch(
        model: torch.nn.Module,
        model_name: str,
        grid: Tuple[int, int],
        data: Tuple[torch.Tensor, ...],
        log: Callable[[str], None],
        **train_kwargs: Any,
) -> Dict[str, Any]:
    """``train`` on the digits, with a line saying what is trained how; returns its history."""
    x_train, y_train, x_test, y_test = data[:4]
    n_params = sum(p.numel() for p in model.parameters())
    mixup = train_kwargs['mixup']
    log(f'training {model_name} ({n_params:,} params, peripheral initialization, {grid[0]}x{grid[1]} token '
        f'grid), batch {train_kwargs["batch_size"]}, AdamW lr {train_kwargs["lr"]:g}, cosine schedule, label '
        f'smoothing {train_kwargs["smoothing"]:g}, random-resized-crop {train_kwargs["crop_scale"]:g}..1'
        + (f', mixup {mixup:g}' if mixup > 0 else ''))
    return train(model, x_train, y_train, x_test, y_test, log=log, **train_kwargs)


def _train_summary(hist: Dict[str, Any]) -> Dict[str, Any]:
    """The training history for summary.json: every epoch, the first and last few step losses."""
    summary = {k: v for k, v in hist.items() if k != 'step_losses'}
    summary['first_step_losses'] = hist['step_losses'][:5]
    summary['last_step_losses'] = hist['step_losses'][-5:]
    return summary


def _save_for_hf(
        model: torch.nn.Module, folder: Path, model_name: str, img_size: int,
        model_kwargs: Optional[Dict[str, Any]] = None) -> None:
    """Save the trained model as a hub-ready folder (config.json + model.safetensors) with metadata of these weights
    (digits, 10 classes, their preprocessing), not of the ImageNet-1k release."""
    from .model_card import save_for_hf
    save_for_hf(
        model, folder,
        description=f'{model_name} trained from scratch by `python -m timm_pervit demo` on scikit-learn digits '
                    f'upsampled to {img_size} px (held-out top-1 in summary.json).',
        tag='sklearn_digits',
        notes=('Demo weights: 10 digit classes, not ImageNet.',),
        label_names=[str(i) for i in range(NUM_CLASSES)],
        data_config=dict(input_size=(3, img_size, img_size), mean=DIGITS_MEAN, std=DIGITS_STD, crop_pct=1.0,
                         interpolation='bilinear'),
        model_args=model_kwargs)


def _log_accuracy(acc: float, hist: Optional[Dict[str, Any]], log: Callable[[str], None]) -> None:
    if hist is not None:
        log(f'held-out top-1: {100 * acc:.2f}% after {hist["seconds"]:.0f} s of training ({hist["epochs"]} epoch(s), '
            f'{hist["steps"]} steps; {hist["cpu_seconds"]:.0f} s of CPU time on {torch.get_num_threads()} thread(s))')
    else:
        log(f'held-out top-1: {100 * acc:.2f}%')


def _check_reloads(
        folder: Path,
        logits: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        log: Callable[[str], None],
) -> Dict[str, Dict[str, Any]]:
    """Reload ``folder`` through timm's pretrained path (and torch.hub when the repository is here).

    Returns:
        Per way of reloading: its accuracy, whether its predictions are those of ``logits``, the largest logit
        difference.

    Raises:
        RuntimeError: When a reloaded model predicts differently.
    """
    reloads = {}
    reloaded = create_model_from_folder(folder)
    reloads['timm local-dir'] = evaluate(reloaded, x_test)
    repo = _repo_root()
    if repo is not None:
        cfg = json.loads((folder / 'config.json').read_text())
        args = {k: v for k, v in cfg.get('model_args', {}).items() if k != 'num_classes'}
        hub_model = torch.hub.load(
            str(repo), cfg['architecture'], source='local', pretrained=True, num_classes=cfg['num_classes'],
            pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors'), num_classes=cfg['num_classes']),
            **args)
        reloads['torch.hub (local repo)'] = evaluate(hub_model, x_test)
    else:
        log('torch.hub reload skipped: no hubconf.py next to the package (installed without the repository)')
    results = {}
    for how, rl in reloads.items():
        same = bool(torch.equal(rl.argmax(-1), logits.argmax(-1)))
        diff = (rl - logits).abs().max().item()
        racc = _top1(rl, y_test)
        results[how] = dict(accuracy=racc, identical_predictions=same, max_abs_logit_diff=diff)
        log(f'reloaded via {how}: top-1 {100 * racc:.2f}%, identical predictions: {same} '
            f'(max |logit diff| {diff:.1e})')
        if not same:
            raise RuntimeError(f'the model reloaded via {how} predicts differently from the trained one')
    return results


def _write_plots(
        model: torch.nn.Module,
        grid: Tuple[int, int],
        out: Path,
        raw_test: torch.Tensor,
        y_test: torch.Tensor,
        logits: torch.Tensor,
        nl_init: Optional[torch.Tensor],
        title: str,
) -> Tuple[Dict[str, str], torch.Tensor]:
    """The prediction grid and the position-attention figures (``timm_pervit.tools.visualize``).

    Returns:
        (the PNG paths by summary key, the non-locality of every block and head).
    """
    from .visualize import visualize_model

    pred_path = out / 'predictions.png'
    _plot_predictions(raw_test, y_test, logits.softmax(-1), pred_path)
    viz = visualize_model(model, grid, out, reference_nl=nl_init, dpi=100, title=title)
    files = dict(
        predictions=str(pred_path), position_attention=str(viz['position_attention']),
        non_locality=str(viz['non_locality']))
    return files, viz['nl']


def _write_summary(summary: Dict[str, Any], out: Path, log: Callable[[str], None]) -> None:
    """Write summary.json and log where every output file is."""
    summary_path = out / 'summary.json'
    summary['files']['summary'] = str(summary_path)
    summary_path.write_text(json.dumps(summary, indent=2))
    files = summary['files']
    log(f'\ndone in {summary["total_seconds"]:.0f} s. Output files:')
    folder = files['model']
    log(f'  hub-ready model folder : {folder}  (timm.create_model("local-dir:{folder}", pretrained=True))')
    log(f'  prediction grid        : {files["predictions"]}')
    log(f'  position attention     : {files["position_attention"]}')
    log(f'  non-locality per block : {files["non_locality"]}')
    log(f'  summary (JSON)         : {summary_path}')


def run_demo(
        output_dir: str = 'pervit_demo',
        model_name: str = 'pervit_tiny',
        model_kwargs: Optional[Dict[str, Any]] = None,
        checkpoint: Optional[str] = None,
        img_size: int = 64,
        epochs: Optional[int] = None,
        time_budget: float = 200.,
        max_epochs: int = 15,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        smoothing: float = 0.1,
        crop_scale: float = 0.85,
        mixup: float = 0.,
        max_steps: Optional[int] = None,
        seed: int = 0,
        threads: Optional[int] = None,
        table: bool = True,
        table_img_size: int = 224,
        progress: Union[bool, str] = True,
        log: Callable[[str], None] = _logger.info,
) -> Dict[str, Any]:
    """Run the whole demo; returns (and writes to ``summary.json``) its results and output paths.

    See ``python -m timm_pervit demo --help`` for the arguments; ``log`` receives the progress lines (default: this
    module's logger; the CLI prints them).
    """
    import timm
    from .visualize import non_locality, token_grid

    _check_request(model_name, checkpoint)
    out = _check_output_dir(Path(output_dir))
    t_start = time.perf_counter()
    random.seed(seed)
    torch.manual_seed(seed)
    summary: Dict[str, Any] = dict(model=model_name, img_size=img_size, seed=seed, files={})
    if checkpoint is None:
        model = timm.create_model(model_name, num_classes=NUM_CLASSES, **(model_kwargs or {}))
    else:
        model = create_model_from_folder(checkpoint)
    summary['threads'] = _set_threads(model, img_size, threads, log)
    if table:
        summary['family'] = _log_family_table(table_img_size, log)
    data = _load_data(img_size, seed, log)
    x_test, y_test, raw_test = data[2:]
    grid = token_grid(model, (img_size, img_size))

    if checkpoint is None:
        nl_init = non_locality(model.position_attention(grid), grid)
        hist = _train_from_scratch(
            model, model_name, grid, data, log, epochs=epochs, time_budget=time_budget, max_epochs=max_epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, smoothing=smoothing, crop_scale=crop_scale,
            mixup=mixup, max_steps=max_steps, progress=progress)
        summary['train'] = _train_summary(hist)
        folder = out / f'{model_name}_digits'
        _save_for_hf(model, folder, model_name, img_size, model_kwargs)
    else:
        folder, nl_init, hist = Path(checkpoint), None, None
        log(f'loaded {folder} (no training)')
    summary['files']['model'] = str(folder)

    logits = evaluate(model, x_test)
    summary['accuracy'] = _top1(logits, y_test)
    _log_accuracy(summary['accuracy'], hist, log)
    summary['reload'] = _check_reloads(folder, logits, x_test, y_test, log)

    title = f'{model_name} trained on digits ({img_size} px)' if checkpoint is None else str(folder)
    plots, nl = _write_plots(model, grid, out, raw_test, y_test, logits, nl_init, title)
    summary['files'].update(plots)
    summary['non_locality'] = nl.tolist()
    if nl_init is not None:
        summary['non_locality_init'] = nl_init.tolist()
    summary['total_seconds'] = time.perf_counter() - t_start
    _write_summary(summary, out, log)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m timm_pervit demo``: train, save, reload and plot a PerViT on real digits, offline."""
    parser = argparse.ArgumentParser(
        prog='python -m timm_pervit demo',
        description='Offline end-to-end PerViT demo: family table, train pervit_tiny from scratch on scikit-learn '
                    'digits, save a hub-ready folder, reload it (timm, torch.hub), plot predictions and the learned '
                    'peripheral attention. Needs pip install "timm-pervit[demo]".')
    parser.add_argument('--output-dir', default='pervit_demo', help='output folder (default: ./pervit_demo)')
    parser.add_argument('--model', default='pervit_tiny', help='PerViT variant to train (default: pervit_tiny)')
    parser.add_argument('--model-kwargs', default=None, metavar='JSON',
                        help='extra timm.create_model arguments as JSON, e.g. a smaller model for quick runs')
    parser.add_argument('--checkpoint', default=None,
                        help='skip training: evaluate and plot a folder written by an earlier demo run')
    parser.add_argument('--img-size', type=int, default=64, help='input size in px (default: 64 -> 4x4 tokens)')
    parser.add_argument('--epochs', type=int, default=None,
                        help='training epochs (default: as many as fit --time-budget on this machine)')
    parser.add_argument('--time-budget', type=float, default=200., metavar='SECONDS',
                        help='training time to size the schedule for, from the measured speed (default: 200)')
    parser.add_argument('--max-epochs', type=int, default=15,
                        help='most epochs chosen from --time-budget (default: 15)')
    parser.add_argument('--batch-size', type=int, default=32, help='batch size (default: 32)')
    parser.add_argument('--lr', type=float, default=1e-3, help='peak learning rate (default: 1e-3)')
    parser.add_argument('--weight-decay', type=float, default=0.05, help='AdamW weight decay (default: 0.05)')
    parser.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
    parser.add_argument('--crop-scale', type=float, default=0.85,
                        help='smallest area of the random resized crop augmentation, 1 = off (default: 0.85)')
    parser.add_argument('--mixup', type=float, default=0., help='timm Mixup alpha, 0 = off (default: 0)')
    parser.add_argument('--max-steps', type=int, default=None,
                        help='stop training after this many steps (quick runs; the schedule is not shortened)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (data split, init, order)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads (default: the faster of all and one, timed on a few forwards)')
    parser.add_argument('--no-table', action='store_true', help='skip the family table (and its speed measurements)')
    parser.add_argument('--table-img-size', type=int, default=224, help='input size of the family table (default 224)')
    add_progress_arguments(parser, 'training progress bar')
    args = parser.parse_args(argv)
    try:
        model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise ValueError(f'--model-kwargs must be a JSON object, got {args.model_kwargs!r}')
        run_demo(
            output_dir=args.output_dir, model_name=args.model, model_kwargs=model_kwargs, checkpoint=args.checkpoint,
            img_size=args.img_size, epochs=args.epochs, time_budget=args.time_budget, max_epochs=args.max_epochs,
            batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, smoothing=args.smoothing,
            crop_scale=args.crop_scale, mixup=args.mixup, max_steps=args.max_steps, seed=args.seed,
            threads=args.threads, table=not args.no_table,
            table_img_size=args.table_img_size, progress=args.progress,
            log=functools.partial(print, flush=True))  # flushed: a log file shows each line when it happens
    except (ValueError, FileNotFoundError, PermissionError, ImportError, RuntimeError) as e:
        print(f'python -m timm_pervit demo: error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
