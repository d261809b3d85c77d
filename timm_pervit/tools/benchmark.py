""" Speed and memory benchmark of PerViT against the explicit official formulation

``python -m timm_pervit benchmark`` (also ``pervit-benchmark``) times the model as shipped -- and optionally with
``torch.compile``, bfloat16 autocast and channels-last input -- side by side with ``reference``: the same weights run
through the official computation (explicit attention formula, unfolded position encoder rebuilt every training step
and computed once at inference, as the official code does; see ``timm_pervit.tools.reference``).

How it measures:

* Correctness first: every candidate's output (and in training every parameter gradient) on the benchmark batch is
  compared with the explicit formula computed in float64; a candidate whose error exceeds a small tolerance plus
  twice the error of the explicit formula itself in the same precision (float32, or bfloat16 autocast) stops the
  run with exit code 1.
* Warm-up, then rounds in which every candidate runs once, in turn (A/B/A/B...), so that drift and noise from other
  processes hit all of them alike. Ratios are the median of the per-round ratios against the reference.
* Peak memory of one step: on CPU the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before the step; ``step`` is the growth over the resident set before the step), on CUDA
  ``torch.cuda.max_memory_allocated``.
* MACs counted with ``torch.utils.flop_counter`` on the candidate's own (eager) computation; achieved GFLOP/s is
  2 * MACs * img/s, and the roofline is a large GEMM timed in-process in the candidate's compute dtype.

Two more kinds of rows can join the same rounds:

* ``--official-repo PATH``: ``official``, the authors' own code imported from a checkout of
  https://github.com/juhongm999/pervit (see ``timm_pervit.tools.official``) with the same weights, in float32 eager,
  prepared as its scripts do (``init_rpe()`` at inference, position attention rebuilt every training step). It is
  gated like any candidate, and in addition its float64 run must reproduce the float64 truth (the explicit formula) to
  float64 rounding; ``--baseline official`` makes it the row the ratios are taken against. It only accepts 224 x 224
  input (its distance table is built for 14 x 14 tokens); at other sizes it is left out with a warning.
* ``--peers NAME[,NAME...]``: other timm models (e.g. ``deit_tiny_patch16_224``), eager, same batch, input size and
  mode, so PerViT's efficiency (img/s, GMACs, % of the GEMM roofline) can be set against timm's own models. Peers
  compute other functions: they are not correctness-gated (``peer`` in the error column).

``--scale SIZE[,SIZE...]`` measures instead how the cost grows with the input size: PerViT as shipped, the explicit
formula, the official code (where it runs) and the peers (``dynamic_img_size=True`` where they take it) at every
size, each (candidate, size) in its own fresh process so that its peak memory is its own (see ``run_scale``), with a
table, ``--json`` rows and a log-log ``--scale-plot``.

Example::

    python -m timm_pervit benchmark --model pervit_tiny --batch-size 32 --threads 2 --mode both --amp --compile
    python -m timm_pervit benchmark --model pervit_tiny --batch-size 32 --threads 2 --mode both \
        --official-repo ../pervit --peers deit_tiny_patch16_224,convit_tiny
    python -m timm_pervit benchmark --scale 224,448,672,896,1024 --model pervit_tiny --peers deit_tiny_patch16_224 \
        --threads 2 --scale-train --scale-plot docs/scaling.png --json scaling.json
"""
import argparse
import contextlib
import copy
import gc
import json
import logging
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm

from ..checkpoint_io import load_checkpoint
from ..pervit import PerViT, checkpoint_filter_fn
from .flops import flop_counter_mode
from .official import (
    OfficialCode, build_official_model, load_official_code, official_grads_to_timm, official_token_grid)
from .progress import Progress, add_progress_arguments
from .reference import OfficialFormula

__all__ = [
    'Candidate', 'CorrectnessError', 'CorrectnessGate', 'BenchmarkResult', 'parse_candidates', 'check_candidate',
    'gemm_roofline', 'count_macs', 'peak_memory', 'run_benchmark', 'format_table', 'ScalePoint',
    'official_formula_bytes', 'run_scale', 'format_scale_table', 'plot_scale', 'main',
]

_logger = logging.getLogger(__name__)

#: Candidate names accepted by ``--candidates``: ``eager`` or ``+``-joined options, e.g. ``compile+amp``.
CANDIDATE_OPTIONS = ('compile', 'amp', 'channels_last', 'int8')

#: Relative tolerance of the correctness gate for full-precision candidates: (outputs, gradients).
TOLERANCES = {'float32': (2e-4, 2e-3), 'float64': (1e-9, 1e-7)}

#: Relative output tolerance of the ``int8`` candidate (``quantize_dynamic`` of every Linear, inference only): the
#: weight rounding itself; a wrong computation still errs by order one.
INT8_TOLERANCE = 0.25

#: Relative tolerance (outputs, gradients) of the official code's float64 run against the float64 truth. Looser than
#: ``TOLERANCES['float64']`` because the official code builds its distance table in float32 whatever the model's
#: dtype, which puts float32 rounding of the distances into its float64 results; still far below the error of any
#: float32 run, and far below what a real difference in the computation (a missing term, a wrong weight) causes.
OFFICIAL_TRUTH_TOLERANCES = {'float64': (1e-8, 1e-6)}


class CorrectnessError(RuntimeError):
    """A candidate's results differ from the reference beyond the tolerance: its timings would be meaningless."""


@dataclass(frozen=True)
class Candidate:
    """One way of running the model. ``reference`` is the explicit official formulation (always fp32 eager),
    ``official`` the authors' code (fp32 eager), ``peer`` another timm model named ``name`` (fp32 eager, ungated)."""
    name: str
    reference: bool = False
    compile: bool = False
    amp: bool = False
    channels_last: bool = False
    int8: bool = False
    official: bool = False
    peer: bool = False

    @property
    def kind(self) -> str:
        return 'reference' if self.reference else 'official' if self.official else 'peer' if self.peer else 'ours'


@dataclass
class BenchmarkResult:
    """Measurements of one candidate in one mode at one input size."""
    candidate: str
    mode: str
    img_size: int
    batch_size: int
    kind: str = 'ours'
    baseline: str = 'reference'
    img_per_s: List[float] = field(default_factory=list)
    ratio: float = float('nan')
    peak_mem_mb: float = float('nan')
    step_mem_mb: float = float('nan')
    mem_ratio: float = float('nan')
    params: int = 0
    gmacs_per_img: float = float('nan')
    roofline_gflops: float = float('nan')
    max_rel_err: float = float('nan')
    warmup_s: float = float('nan')
    pos_share: float = float('nan')
    f64_err: float = float('nan')  # official only: its float64 run against the float64 truth

    @property
    def median(self) -> float:
        return statistics.median(self.img_per_s) if self.img_per_s else float('nan')

    @property
    def achieved_gflops(self) -> float:
        return 2 * self.gmacs_per_img * self.median

    @property
    def roofline_pct(self) -> float:
        return 100. * self.achieved_gflops / self.roofline_gflops

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(
            img_per_s_median=self.median,
            img_per_s_min=min(self.img_per_s, default=float('nan')),
            img_per_s_max=max(self.img_per_s, default=float('nan')),
            achieved_gflops=self.achieved_gflops,
            roofline_pct=self.roofline_pct,
        )
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def parse_candidates(names: Sequence[str], official: bool = False, peers: Sequence[str] = ()) -> List[Candidate]:
    """Turn names like ``eager``, ``compile``, ``amp+channels_last`` into candidates (the reference comes first).

    Args:
        names: Candidate names of this implementation.
        official: Add ``official``, the authors' code (needs an ``OfficialCode`` in ``run_benchmark``).
        peers: Names of timm models to time alongside (after the PerViT candidates).

    Raises:
        ValueError: For an unknown option, naming the accepted ones, or a peer timm does not know.
    """
    out = [Candidate('reference', reference=True)]
    for name in names:
        name = name.strip()
        opts = set() if name == 'eager' else set(name.split('+'))
        unknown = opts - set(CANDIDATE_OPTIONS)
        if unknown:
            raise ValueError(
                f'Unknown candidate option(s) {sorted(unknown)} in {name!r}: use "eager" or options joined by "+" '
                f'from {", ".join(CANDIDATE_OPTIONS)} (e.g. "compile+amp").')
        if any(c.name == name for c in out):
            continue
        out.append(Candidate(name, compile='compile' in opts, amp='amp' in opts, channels_last='channels_last' in opts,
                             int8='int8' in opts))
    if official:
        out.append(Candidate('official', official=True))
    for name in peers:
        name = name.strip()
        if not name or any(c.name == name for c in out):
            continue
        if not timm.is_model(name):
            raise ValueError(f'Unknown peer model {name!r}: --peers takes timm model names, e.g. '
                             f'deit_tiny_patch16_224,convit_tiny (see timm.list_models()).')
        out.append(Candidate(name, peer=True))
    return out


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def gemm_roofline(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best of ``repeats`` timings of a square GEMM, in GFLOP/s: the machine's practical compute limit."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    _sync(device)
    best = float('inf')
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


def count_macs(fn: Callable[[], Any]) -> int:
    """Multiply-accumulates of one call of ``fn`` counted with ``torch.utils.flop_counter`` (FLOPs / 2).

    Uses ``timm_pervit.tools.flops.flop_counter_mode``, which also counts the CPU flash-attention kernel.
    """
    with flop_counter_mode() as counter:
        fn()
    return counter.get_total_flops() // 2


def _read_status_kb(key: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            m = re.search(rf'^{key}:\s+(\d+)\s+kB', f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM to the current resident set size
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``) so the resident set is the live memory."""
    try:
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Tuple[float, float]:
    """Run ``fn`` once and return (peak memory, growth over the memory before the call), in MiB.

    CUDA: allocator peak (``torch.cuda.max_memory_allocated``). CPU: peak resident set size from ``/proc`` (Linux);
    where the peak cannot be reset, ``resource.getrusage`` (the process-lifetime peak) is returned for both.
    """
    gc.collect()
    if device.type == 'cuda':
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak / 2 ** 20, (peak - before) / 2 ** 20
    _trim_heap()
    before_kb = _read_status_kb('VmRSS')
    if before_kb is not None and _reset_peak_rss():
        fn()
        peak_kb = _read_status_kb('VmHWM') or 0
        return peak_kb / 1024, (peak_kb - before_kb) / 1024
    import resource
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak, float('nan')


def _quantize_int8(model: nn.Module) -> nn.Module:
    """torch's dynamic int8 quantization of every Linear, the standard CPU deployment recipe for transformers."""
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError('the int8 candidate quantizes a float32 model: run the benchmark in float32')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.ao's notice that eager-mode quantization moves to torchao
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _create_peer(name: str, base: PerViT, img_size: int, device: torch.device, seed: int = 0) -> nn.Module:
    """A randomly initialised timm model for ``img_size`` inputs with ``base``'s number of classes."""
    torch.manual_seed(seed)
    kwargs = dict(num_classes=base.num_classes, in_chans=base.in_chans)
    try:
        model = timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError:  # models without a fixed input size (e.g. CNNs) take no img_size
        model = timm.create_model(name, **kwargs)
    return model.to(device)


class _Runner:
    """A candidate's own model copy (and optimizer) with a ``step()`` for one mode.

    ``model`` holds the parameters (a PerViT, the official model or a peer), ``module`` is what a step calls.
    """

    def __init__(self, cand: Candidate, base: PerViT, x: torch.Tensor, y: torch.Tensor, mode: str,
                 official_code: Optional[OfficialCode] = None):
        self.cand = cand
        self.mode = mode
        self.official_code = official_code
        if cand.official:
            if official_code is None:
                raise ValueError('the official candidate needs the official code (run_benchmark(official_code=...))')
            model = build_official_model(official_code, base, mode, device=x.device, dtype=x.dtype)
        elif cand.peer:
            model = _create_peer(cand.name, base, x.shape[-1], x.device).to(x.dtype)
        else:
            model = copy.deepcopy(base)
        if cand.int8:
            model = _quantize_int8(model)
        if cand.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        self.model = model
        self.module: nn.Module = OfficialFormula(model) if cand.reference else model
        self.fn: nn.Module = torch.compile(self.module) if cand.compile else self.module
        self.x, self.y = x, y
        self.device = x.device
        self.opt = torch.optim.AdamW(self.module.parameters(), lr=1e-6) if mode == 'train' else None
        self.module.train(mode == 'train')

    def _autocast(self, amp: Optional[bool] = None) -> contextlib.AbstractContextManager:
        if self.cand.amp if amp is None else amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cand.amp else self.x.dtype

    def forward_backward(self, fn: Optional[Callable] = None, amp: Optional[bool] = None) -> torch.Tensor:
        """Forward (+ loss backward in training); returns the output. ``amp`` overrides the candidate's autocast."""
        fn = fn or self.fn
        if self.mode == 'train':
            with self._autocast(amp):
                out = fn(self.x)
                loss = F.cross_entropy(out.float(), self.y)
            loss.backward()
            return out
        with torch.no_grad(), self._autocast(amp):
            return fn(self.x)

    def step(self) -> None:
        if self.mode == 'train':
            self.opt.zero_grad(set_to_none=True)
            self.forward_backward()
            self.opt.step()
        else:
            self.forward_backward()
        _sync(self.device)

    def grads(self) -> Dict[str, torch.Tensor]:
        """Parameter gradients keyed by this implementation's parameter names."""
        grads = {
            n: p.grad.detach().to(torch.promote_types(p.grad.dtype, torch.float32), copy=True)
            for n, p in self.model.named_parameters() if p.grad is not None}
        return official_grads_to_timm(grads) if self.cand.official else grads


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _errors(out: torch.Tensor, grads: Dict[str, torch.Tensor], out_ref: torch.Tensor,
            grads_ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Relative errors of the output and of every parameter gradient against the reference's."""
    errs = {'output': _rel_err(out, out_ref)}
    if grads_ref:
        # per-parameter error relative to the parameter's gradient norm, floored at 1% of the largest one: some
        # gradients are zero up to rounding (e.g. conv biases followed by instance norm) and have no relative error
        floor = 1e-2 * max(g.norm().item() for g in grads_ref.values())
        for name, g in grads_ref.items():
            if name not in grads:
                errs[f'gradient of {name}'] = float('inf')
                continue
            errs[f'gradient of {name}'] = ((grads[name] - g).norm() / max(g.norm().item(), floor, 1e-30)).item()
    return errs


def _run_restoring(r: _Runner, amp: Optional[bool] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One forward (+ backward) without optimizer step; the model state (BatchNorm statistics) is restored after."""
    state = copy.deepcopy(r.model.state_dict())
    r.module.zero_grad(set_to_none=True)
    out = r.forward_backward(amp=amp)
    grads = r.grads() if r.mode == 'train' else {}
    r.model.load_state_dict(state)
    r.module.zero_grad(set_to_none=True)
    return out, grads


class CorrectnessGate:
    """Checks candidates against the ground truth: the explicit official formula computed in float64.

    A candidate may compute in another order than the reference (other kernels, memory formats, fused ops), so its
    float32 results differ from the float32 reference's by rounding; some gradients (e.g. of the first layers, behind
    several BatchNorms) are ill-conditioned and lose several digits that way in *any* float32 computation, the
    reference's included. So every candidate is measured against the float64 reference, and each of its errors (the
    output's and, in training, every parameter gradient's) may be at most ``TOLERANCES`` plus twice the error the
    explicit formula itself makes in the candidate's precision (float32, or bfloat16 autocast for ``amp``
    candidates) -- an honest reordering passes, a wrong computation (errors of order one) cannot.

    With ``float64=False`` the truth is the reference's own run in its dtype (no float64 copy: half the memory, for
    sizes where the float64 run does not fit); then only ``TOLERANCES`` (and for ``amp`` candidates twice the
    explicit formula's own bfloat16 error) separate a candidate from the reference's rounding.
    """

    def __init__(self, reference: _Runner, float64: bool = True):
        self.reference = reference
        self.truth_dtype = torch.float64 if float64 else reference.x.dtype
        if self.truth_dtype == reference.x.dtype:  # the reference's own run is the truth
            self.truth = _run_restoring(reference, amp=False)
        else:
            r64 = _Runner(reference.cand, reference.model, reference.x.double(), reference.y, reference.mode)
            r64.module.double()  # the runner's own copy of the weights
            self.truth = _run_restoring(r64, amp=False)
            del r64
        self._own_errors: Dict[bool, Dict[str, float]] = {}

    def reference_errors(self, amp: bool) -> Dict[str, float]:
        """The explicit formula's own errors against the truth, in float32 (or bfloat16 autocast)."""
        if amp not in self._own_errors:
            if not amp and self.truth_dtype == self.reference.x.dtype:
                self._own_errors[amp] = {k: 0. for k in _errors(*self.truth, *self.truth)}
            else:
                self._own_errors[amp] = _errors(*_run_restoring(self.reference, amp=amp), *self.truth)
        return self._own_errors[amp]

    def check_official_truth(self, runner: _Runner) -> float:
        """Run the official code in the truth's dtype and compare it with the truth (the explicit formula).

        Both compute the same function on the same weights in float64, so they must agree to float64 rounding plus
        that of the official float32 distance table (``OFFICIAL_TRUTH_TOLERANCES``): this checks the explicit
        formula (and the weight conversion) against the authors' own code, on the benchmark batch, in this process.

        Returns:
            The largest relative error (output and, in training, every parameter gradient).

        Raises:
            CorrectnessError: When the two disagree.
        """
        ref = self.reference
        r = _Runner(runner.cand, ref.model, ref.x.to(self.truth_dtype), ref.y, ref.mode, runner.official_code)
        errs = _errors(*_run_restoring(r, amp=False), *self.truth)
        del r
        dtype = str(self.truth_dtype).replace('torch.', '')
        out_tol, grad_tol = OFFICIAL_TRUTH_TOLERANCES.get(dtype, TOLERANCES[dtype])
        what = max(errs, key=lambda k: errs[k] / (out_tol if k == 'output' else grad_tol))
        if not errs[what] <= (out_tol if what == 'output' else grad_tol):
            raise CorrectnessError(
                f'the official code ({ref.mode}, {dtype}) disagrees with the explicit formula ({dtype}): relative '
                f'error of the {what} is {errs[what]:.3g}, tolerance {out_tol if what == "output" else grad_tol:.3g}. '
                f'The explicit formula or the weight conversion (timm_pervit.timm_to_official) is wrong, or the '
                f'official code at {runner.official_code.path} is not the released one.')
        return max(errs.values())

    def check(self, runner: _Runner) -> float:
        """Compare a candidate with the truth before any timing.

        Returns:
            The largest relative error found.

        Raises:
            CorrectnessError: Naming the candidate, what differs and by how much.
        """
        errs = _errors(*_run_restoring(runner), *self.truth)
        dtype = 'float32' if runner.cand.amp or runner.cand.int8 else str(runner.x.dtype).replace('torch.', '')
        out_tol, grad_tol = (INT8_TOLERANCE, float('nan')) if runner.cand.int8 else TOLERANCES[dtype]
        own = self.reference_errors(runner.cand.amp)
        allowed = {k: (out_tol if k == 'output' else grad_tol) + 2 * own.get(k, 0.) for k in errs}
        what = max(errs, key=lambda k: errs[k] / allowed[k])
        if not errs[what] <= allowed[what]:
            truth = str(self.truth_dtype).replace('torch.', '')
            raise CorrectnessError(
                f'candidate {runner.cand.name!r} ({runner.mode}) disagrees with the explicit official formula: '
                f'relative error of the {what} is {errs[what]:.3g} against the {truth} result, tolerance '
                f'{allowed[what]:.3g} for {runner.compute_dtype} (the explicit formula itself: '
                f'{own.get(what, 0.):.3g}). '
                f'Its timings would be meaningless, so the benchmark stops; fix the model (or the candidate) first.')
        return max(errs.values())


def check_candidate(runner: _Runner, reference: _Runner, gate: Optional[CorrectnessGate] = None) -> float:
    """Check one candidate against the float64 explicit formula (see ``CorrectnessGate``); returns its max error.

    Both runners must hold models with equal weights; ``gate`` (built from ``reference``) can be passed to reuse its
    float64 run across candidates.

    Raises:
        CorrectnessError: Naming the candidate, what differs and by how much.
    """
    return (gate or CorrectnessGate(reference)).check(runner)


def _position_build_seconds(model: PerViT, h: int, w: int) -> float:
    """Time to build the position attention of all blocks with its backward, as a training step does."""
    t = time.perf_counter()
    sum(p.sum() for p in model.pos_attn.compute(h, w)).backward()
    _sync(model.pos_attn.dist_proj.weight.device)
    elapsed = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return elapsed


def _token_grid(model: PerViT, img_size: int) -> Tuple[int, int]:
    n = img_size
    for _ in range(len(model.stem) - 1):  # stride-2, padding-1 3x3 convs, then the 1x1 conv
        n = (n + 1) // 2
    return n, n


def run_benchmark(
        base: PerViT,
        candidates: Sequence[Candidate],
        img_size: int,
        batch_size: int,
        mode: str,
        device: torch.device,
        warmup: int = 2,
        iters: int = 10,
        rooflines: Optional[Dict[torch.dtype, float]] = None,
        progress: Union[bool, str] = True,
        seed: int = 0,
        gate_float64: bool = True,
        official_code: Optional[OfficialCode] = None,
        baseline: str = 'reference',
) -> List[BenchmarkResult]:
    """Benchmark ``candidates`` (the first must be the reference) on one input size in one mode.

    ``gate_float64=False`` checks the candidates against the reference's own float32 run instead of a float64 one
    (see ``CorrectnessGate``). ``official_code`` is needed by an ``official`` candidate, which is left out (with a
    warning) at input sizes the official code does not accept. Ratios are taken against the ``baseline`` candidate
    (the reference when that one is not in the run). ``progress`` (``timm_pervit.tools.progress.resolve_mode``): a bar
    on stderr when it is a terminal, otherwise a line through this module's logger at every tenth of the timed steps
    (True / 'auto'), or 'bar', 'log', False / 'off'.

    Raises:
        CorrectnessError: When a candidate disagrees with the reference, or the official code with the truth.
    """
    if not candidates or not candidates[0].reference:
        raise ValueError('the first candidate must be the reference (use parse_candidates())')
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, base.in_chans, img_size, img_size, generator=g).to(device)
    num_classes = max(base.num_classes, 1)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    runners = []
    for c in candidates:
        if c.int8 and mode == 'train':
            _logger.warning('leaving out %s in training: dynamic int8 quantization is for inference', c.name)
            continue
        runner = _Runner(c, base, x, y, mode, official_code)
        grid = official_token_grid(runner.model) if c.official else None
        if grid is not None and (grid, grid) != _token_grid(base, img_size):
            _logger.warning('leaving out the official code at %dpx: it only accepts a %dx%d token grid (%dpx input)',
                            img_size, grid, grid, img_size * grid // _token_grid(base, img_size)[0])
            continue
        runners.append(runner)
    names = [r.cand.name for r in runners]
    if baseline not in names:
        _logger.warning('baseline %r is not in the %s %dpx run: ratios are against the reference', baseline, mode,
                        img_size)
        baseline = 'reference'
    base_idx = names.index(baseline)
    results = [BenchmarkResult(r.cand.name, mode, img_size, batch_size, r.cand.kind, baseline) for r in runners]

    # correctness gate (it is also the first warm-up call, which compiles the compiled candidates); peers compute
    # other functions and are not gated
    gate = CorrectnessGate(runners[0], float64=gate_float64)
    for runner, res in zip(runners, results):
        t = time.perf_counter()
        if runner.cand.reference:
            res.max_rel_err = max(gate.reference_errors(False).values())
        elif runner.cand.peer:
            _run_restoring(runner)  # warm-up only
        else:
            res.max_rel_err = gate.check(runner)
        res.warmup_s = time.perf_counter() - t
        if runner.cand.official and gate.truth_dtype != runner.x.dtype:
            res.f64_err = gate.check_official_truth(runner)
        # the float model's count for int8 (its quantized Linears hold packed weights, no parameters)
        res.params = sum(p.numel() for p in (base if runner.cand.int8 else runner.model).parameters())
        if rooflines is not None:
            res.roofline_gflops = rooflines.get(runner.compute_dtype, float('nan'))
    del gate

    ours = next((r for r in runners if r.cand.kind == 'ours'), None)
    with Progress(len(runners) * (warmup + iters), f'{mode} {img_size}px', progress, log=_logger.info,
                  leave=False) as bar:
        for _ in range(warmup):
            for runner in runners:
                runner.step()
                bar.update()
        per_round: List[List[float]] = [[] for _ in runners]
        pos_times: List[float] = []
        for _ in range(iters):
            for i, runner in enumerate(runners):
                t = time.perf_counter()
                runner.step()
                per_round[i].append(time.perf_counter() - t)
                bar.update()
            if mode == 'train' and ours is not None:
                # the position attention is rebuilt (with backward) every training step: time it in the same round
                pos_times.append(_position_build_seconds(ours.model, *_token_grid(base, img_size)))
    base_times = per_round[base_idx]
    for res, times in zip(results, per_round):
        res.img_per_s = [batch_size / t for t in times]
        res.ratio = statistics.median(r / t for r, t in zip(base_times, times))

    for runner, res in zip(runners, results):
        res.peak_mem_mb, res.step_mem_mb = peak_memory(runner.step, device)
        eager = runner.module  # count the eager computation (compile and autocast change how, not what)
        if runner.cand.int8:  # the float model's work: FlopCounterMode counts no quantized matmul
            res.gmacs_per_img = results[0].gmacs_per_img
        else:
            res.gmacs_per_img = count_macs(lambda: runner.forward_backward(eager)) / batch_size / 1e9
        runner.module.zero_grad(set_to_none=True)
    base_step = results[base_idx].step_mem_mb
    for res in results:
        res.mem_ratio = res.step_mem_mb / base_step if base_step and base_step > 0 else float('nan')

    # share of a training step spent building the position attention (cached at inference: no share)
    if pos_times:
        for res, times in zip(results, per_round):
            if res.kind == 'ours':
                res.pos_share = statistics.median(p / t for p, t in zip(pos_times, times))
    del runners
    gc.collect()
    return results


def _fmt(v: float, spec: str) -> str:
    return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(results: Sequence[BenchmarkResult], device: torch.device) -> str:
    """A Markdown table of results (one row per candidate, mode and input size).

    ``ratio`` and ``step MiB (ratio)`` are against each row's ``baseline``; ``peer`` rows (other models) have no
    error; the ``official`` row's error column adds its float64 run's error against the float64 truth.
    """
    mem = 'peak alloc MiB' if device.type == 'cuda' else 'peak RSS MiB'
    head = [
        'mode', 'img', 'batch', 'candidate', 'img/s median (min-max)', 'ratio', mem, 'step MiB (ratio)', 'params',
        'GMACs/img', 'GFLOP/s', '% roofline', 'pos build', 'max rel err']
    rows = []
    for r in results:
        if r.kind == 'peer':
            pos, err = '-', 'peer'
        else:
            pos = ('init_rpe' if r.kind == 'official' else 'cached') if r.mode == 'infer' else (
                _fmt(100 * r.pos_share, '.1f') + '%' if r.kind == 'ours' else 'every fwd')
            err = _fmt(r.max_rel_err, '.1e')
            if not math.isnan(r.f64_err):
                err += f' (f64 {_fmt(r.f64_err, ".0e")})'
        rows.append([
            r.mode, str(r.img_size), str(r.batch_size), r.candidate,
            f'{_fmt(r.median, ".1f")} ({_fmt(min(r.img_per_s), ".1f")}-{_fmt(max(r.img_per_s), ".1f")})',
            _fmt(r.ratio, '.2f') + 'x', _fmt(r.peak_mem_mb, '.0f'),
            f'{_fmt(r.step_mem_mb, ".0f")} ({_fmt(r.mem_ratio, ".2f")}x)', f'{r.params:,}',
            _fmt(r.gmacs_per_img, '.3f'), _fmt(r.achieved_gflops, '.0f'), _fmt(r.roofline_pct, '.0f'), pos, err,
        ])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


# ---- --scale: measured cost against the input size -------------------------------------------------------------
#: Share of the memory free at the start of a ``--scale`` run (CPU: ``MemAvailable``; CUDA: free device memory) that
#: the explicit formula may be estimated to need at one point before that point is reported n/a instead of run.
SCALE_MEMORY_SHARE = 0.8

#: Batch size of the ``--scale`` inference and training points.
SCALE_BATCH = {'infer': 1, 'train': 2}

# run in a fresh interpreter: the benchmark module (named by argv[1]) measures one point described by a JSON file
_CHILD_CODE = 'import importlib, sys; sys.exit(importlib.import_module(sys.argv[1])._scale_child(sys.argv[2]))'


class _NotApplicable(Exception):
    """A candidate cannot run at a point (e.g. the official code at another token grid): reported as n/a."""


@dataclass
class ScalePoint:
    """One candidate at one input size of ``--scale``; times in seconds, memory in MiB.

    ``first_s`` is the first inference call (for PerViT and the explicit formula it includes building the position
    attention), ``steady_s`` the median of the timed calls after the warm-up. ``peak_mb`` is the peak of the point's
    own process over the inference calls (CPU: resident set; CUDA: allocator peak) and ``step_mb`` its growth over the
    memory held before the first call; ``train_*`` the same for the training step (forward, backward, SGD step).
    ``ratio``/``train_ratio``/``mem_ratio`` are PerViT's figure divided by this candidate's at the same size (below 1:
    PerViT is faster or smaller). ``na``/``train_na`` say why a measurement is missing.
    """
    img_size: int
    tokens: int
    candidate: str
    kind: str
    first_s: float = float('nan')
    steady_s: float = float('nan')
    times_s: List[float] = field(default_factory=list)
    peak_mb: float = float('nan')
    step_mb: float = float('nan')
    train_s: float = float('nan')
    train_times_s: List[float] = field(default_factory=list)
    train_peak_mb: float = float('nan')
    train_step_mb: float = float('nan')
    build_s: float = float('nan')  # PerViT: position attention of all blocks, under no_grad
    build_gflop: float = float('nan')
    build_gflops: float = float('nan')
    build_gemm_pct: float = float('nan')
    train_build_s: float = float('nan')  # PerViT: the same with its backward, as every training step does
    ratio: float = float('nan')
    train_ratio: float = float('nan')
    mem_ratio: float = float('nan')
    rel_err: float = float('nan')  # reference/official: first output against PerViT's (same weights and input)
    na: str = ''
    train_na: str = ''

    def to_dict(self) -> Dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def official_formula_bytes(model: PerViT, img_size: int, batch_size: int, train: bool) -> int:
    """Rough size of the largest tensors the explicit official formula holds at once for one step, in bytes.

    The position encoder runs every block's first conv on a (N, 4H, h+4, w+4) map (N = h*w queries), every block
    keeps an (H, N, N) position attention and the attention materialises (B, H, N, N) tensors. At inference the
    position attention of all blocks is kept and one block's temporaries are alive at a time; in training autograd
    keeps every block's. Used by ``--scale`` to skip points that would exhaust the machine's memory.
    """
    h, w = _token_grid(model, img_size)
    n, heads, depth = h * w, model.num_heads, len(model.blocks)
    feats = n * 4 * heads * (h + 4) * (w + 4)
    conv1 = n * 4 * heads * (h + 2) * (w + 2)  # conv1, norm and relu outputs: three of these
    phi = heads * n * n
    attn = batch_size * heads * n * n  # logits, exp, product and normalised weights: four or five
    if train:
        values = feats + depth * (3 * conv1 + 3 * phi + 5 * attn)
    else:
        values = feats + 3 * conv1 + depth * phi + 4 * attn
    return values * model.pos_attn.dist_proj.weight.element_size()


def _available_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0] / 2 ** 20
    kb = None
    try:
        with open('/proc/meminfo') as f:
            m = re.search(r'^MemAvailable:\s+(\d+)\s+kB', f.read(), re.MULTILINE)
            kb = int(m.group(1)) if m else None
    except OSError:
        pass
    return kb / 1024 if kb is not None else float('inf')


def _create_scale_peer(name: str, base: PerViT, device: torch.device) -> Tuple[nn.Module, bool]:
    """A timm model in its default configuration, with ``dynamic_img_size=True`` where it takes it (timm's
    vision_transformer does: the position embedding is resampled to each input's grid); and whether it took it."""
    kwargs = dict(num_classes=base.num_classes, in_chans=base.in_chans)
    try:
        return timm.create_model(name, dynamic_img_size=True, **kwargs).to(device), True
    except TypeError:  # the model's constructor has no such argument
        return timm.create_model(name, **kwargs).to(device), False


def _scale_phase(spec: Dict[str, Any], mode: str) -> Dict[str, Any]:
    """Measure one candidate in one mode at one size in this process (see ``run_scale``)."""
    device = torch.device(spec['device'])
    args = argparse.Namespace(
        model=spec['model'], model_kwargs=spec['model_kwargs'], checkpoint=spec['checkpoint'], seed=spec['seed'])
    base = _build_model(args, device)
    kind, size = spec['kind'], spec['img_size']
    hint = ''
    if kind == 'official':
        net = build_official_model(load_official_code(spec['official_repo']), base, mode, device=device)
        grid = official_token_grid(net)
        if grid is not None and (grid, grid) != _token_grid(base, size):
            raise _NotApplicable(f'the official code only accepts a {grid}x{grid} token grid '
                                 f'({grid * base.stem_stride}px input)')
        module: nn.Module = net
    elif kind == 'peer':
        module, dynamic = _create_scale_peer(spec['candidate'], base, device)
        hint = '' if dynamic else ' (the model takes no dynamic_img_size)'
    elif kind == 'reference':
        module = OfficialFormula(base)
    else:
        module = base
    module.train(mode == 'train')
    batch = SCALE_BATCH[mode]
    g = torch.Generator().manual_seed(spec['seed'])
    x = torch.randn(batch, base.in_chans, size, size, generator=g).to(device)
    y = torch.randint(0, max(base.num_classes, 1), (batch,), generator=g).to(device)
    opt = torch.optim.SGD(module.parameters(), lr=1e-6) if mode == 'train' else None

    def call() -> torch.Tensor:
        if opt is None:
            with torch.no_grad():
                out = module(x)
        else:
            opt.zero_grad(set_to_none=True)
            out = module(x)
            F.cross_entropy(out.float(), y).backward()
            opt.step()
        _sync(device)
        return out

    res: Dict[str, Any] = {}

    def calls() -> None:
        t = time.perf_counter()
        try:
            out = call()
        except Exception as e:  # e.g. a fixed-size model at another size
            raise _NotApplicable(f'{type(e).__name__}: {e}'.strip() + hint) from e
        res['first_s'] = time.perf_counter() - t
        if opt is None and kind != 'peer':
            res['logits'] = out.detach().double().flatten().tolist()
        for _ in range(spec['warmup']):
            call()
        times = []
        for _ in range(spec['iters']):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        res['times_s'] = times

    res['peak_mb'], res['step_mb'] = peak_memory(calls, device)
    if kind == 'ours':
        h, w = _token_grid(base, size)
        repeats = max(1, min(spec['iters'], 3))
        if mode == 'train':
            res['build_s'] = statistics.median(_position_build_seconds(base, h, w) for _ in range(repeats))
        else:
            times = []
            with torch.no_grad():
                for _ in range(repeats):
                    t = time.perf_counter()
                    base.pos_attn.compute(h, w)
                    _sync(device)
                    times.append(time.perf_counter() - t)
                res['build_s'] = statistics.median(times)
                res['build_macs'] = count_macs(lambda: base.pos_attn.compute(h, w))
    return res


def _scale_child(spec_path: str) -> int:
    """Entry point of a ``--scale`` point's own process: read the spec, measure, write the result next to it."""
    with open(spec_path) as f:
        spec = json.load(f)
    if spec['threads'] > 0:
        torch.set_num_threads(spec['threads'])
    logging.basicConfig(level=logging.WARNING, format='%(message)s', stream=sys.stderr)
    out: Dict[str, Any] = {}
    for mode in spec['modes']:
        try:
            out[mode] = _scale_phase(spec, mode)
        except _NotApplicable as e:
            out[mode] = {'na': str(e)}
        except (RuntimeError, MemoryError, ValueError) as e:  # out of memory, a size the model refuses
            out[mode] = {'na': f'{type(e).__name__}: {e}'.strip().splitlines()[0]}
        gc.collect()
        _trim_heap()  # the next mode's peak starts from what the process holds: give the first's memory back
    with open(spec['result'], 'w') as f:
        json.dump(out, f)
    return 0


def _package_root() -> str:
    """The folder holding this package, for the point processes' import path (the same code as this process)."""
    top = sys.modules[__package__.split('.')[0]]
    return os.path.dirname(os.path.dirname(os.path.abspath(top.__file__)))


def _run_point(spec: Dict[str, Any], timeout_s: float) -> Dict[str, Any]:
    """Measure one (candidate, size) in a fresh interpreter, so that its peak memory is its own."""
    module = __spec__.name if __name__ == '__main__' else __name__
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (_package_root(), env.get('PYTHONPATH', '')) if p)
    if spec['threads'] > 0:
        env['OMP_NUM_THREADS'] = str(spec['threads'])
    with tempfile.TemporaryDirectory(prefix='pervit-scale-') as tmp:
        spec = dict(spec, result=os.path.join(tmp, 'result.json'))
        spec_path = os.path.join(tmp, 'spec.json')
        with open(spec_path, 'w') as f:
            json.dump(spec, f)
        try:
            proc = subprocess.run([sys.executable, '-c', _CHILD_CODE, module, spec_path], env=env,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            reason = f'timed out after {timeout_s:.0f} s (--scale-timeout)'
            return {m: {'na': reason} for m in spec['modes']}
        if os.path.exists(spec['result']):
            with open(spec['result']) as f:
                return json.load(f)
    if proc.returncode < 0:
        reason = f'killed by {signal.Signals(-proc.returncode).name}'
        if proc.returncode == -signal.SIGKILL:
            reason += ' (out of memory?)'
    else:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        reason = f'failed (exit code {proc.returncode}): {lines[-1] if lines else "no message"}'
    _logger.debug('point %s %dpx failed:\n%s', spec['candidate'], spec['img_size'], proc.stderr)
    return {m: {'na': reason} for m in spec['modes']}


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float('nan')


def run_scale(
        model: str,
        sizes: Sequence[int],
        peers: Sequence[str] = (),
        model_kwargs: str = '',
        checkpoint: str = '',
        official_repo: str = '',
        device: Union[str, torch.device] = 'cpu',
        threads: int = 0,
        iters: int = 10,
        warmup: int = 2,
        train: bool = False,
        seed: int = 0,
        mem_limit_mb: Optional[float] = None,
        timeout_s: float = 1800.,
        gemm_gflops: float = float('nan'),
) -> List[ScalePoint]:
    """Measure PerViT, the explicit official formula, the official code and timm peers at every input size.

    Every (candidate, size) runs in its own fresh process (``_scale_child``), in turn, so that its peak memory is its
    own: batch 1 inference (first call, then the median of ``iters`` calls after ``warmup``) and, with ``train``, a
    batch 2 training step (forward, backward, SGD step). PerViT is the model as shipped (default settings); the
    explicit formula is ``timm_pervit.tools.reference.OfficialFormula`` on the same weights, the official code is
    imported from ``official_repo`` (it only accepts 224px input) and peers are timm models created with
    ``dynamic_img_size=True`` where they take it. A point the explicit formula or the official code is estimated
    to need more than ``mem_limit_mb`` for (``official_formula_bytes``; default ``SCALE_MEMORY_SHARE`` of the memory
    free now), that fails or that runs past ``timeout_s`` is reported n/a with the reason instead.

    Args:
        model: A PerViT model name; ``model_kwargs`` (JSON object) and ``checkpoint`` as in the benchmark CLI.
        sizes: Square input sizes.
        peers: timm model names.
        gemm_gflops: The measured float32 GEMM rate (``gemm_roofline``) the position build's rate is set against.

    Returns:
        One point per size and candidate, sizes outermost, candidates in the order PerViT, reference, official,
        peers.
    """
    device = torch.device(device)
    args = argparse.Namespace(model=model, model_kwargs=model_kwargs, checkpoint=checkpoint, seed=seed)
    base = _build_model(args, torch.device('cpu'))
    limit = mem_limit_mb if mem_limit_mb else SCALE_MEMORY_SHARE * _available_mb(device)
    cands = [(model, 'ours'), ('reference', 'reference')] + ([('official', 'official')] if official_repo else [])
    cands += [(p, 'peer') for p in peers]
    modes = ('infer', 'train') if train else ('infer',)
    points: List[ScalePoint] = []
    for size in sizes:
        h, w = _token_grid(base, size)
        row: List[ScalePoint] = []
        logits: List[Optional[List[float]]] = []
        for name, kind in cands:
            p = ScalePoint(size, h * w, name, kind)
            skipped: Dict[str, str] = {}
            if kind in ('reference', 'official'):
                for mode in modes:
                    need = official_formula_bytes(base, size, SCALE_BATCH[mode], mode == 'train') / 2 ** 20
                    if need > limit:
                        skipped[mode] = (f'needs about {need / 1024:.1f} GiB (estimate), over the {limit / 1024:.1f} '
                                         f'GiB bound (--scale-mem-limit)')
            run_modes = [m for m in modes if m not in skipped]
            spec = dict(model=model, model_kwargs=model_kwargs, checkpoint=checkpoint, seed=seed, device=str(device),
                        threads=threads, img_size=size, candidate=name, kind=kind, iters=iters, warmup=warmup,
                        official_repo=official_repo, modes=run_modes)
            res = _run_point(spec, timeout_s) if run_modes else {}
            res.update({m: {'na': r} for m, r in skipped.items()})
            inf, tr = res['infer'], res.get('train', {})
            p.na, p.train_na = inf.get('na', ''), tr.get('na', '')
            if not p.na:
                p.first_s, p.times_s, p.peak_mb, p.step_mb = inf['first_s'], inf['times_s'], inf['peak_mb'], \
                    inf['step_mb']
                p.steady_s = _median(p.times_s)
                p.build_s = inf.get('build_s', float('nan'))
                if 'build_macs' in inf:
                    p.build_gflop = 2 * inf['build_macs'] / 1e9
                    p.build_gflops = p.build_gflop / p.build_s
                    p.build_gemm_pct = 100 * p.build_gflops / gemm_gflops
            if train and not p.train_na:
                p.train_times_s, p.train_peak_mb, p.train_step_mb = tr['times_s'], tr['peak_mb'], tr['step_mb']
                p.train_s = _median(p.train_times_s)
                p.train_build_s = tr.get('build_s', float('nan'))
            logits.append(inf.get('logits'))
            _logger.info('%dpx %s: %s', size, name, p.na or f'steady {p.steady_s:.4g} s, peak {p.peak_mb:.0f} MiB')
            row.append(p)
        ours = row[0]
        for p, out in zip(row[1:], logits[1:]):
            p.ratio = ours.steady_s / p.steady_s
            p.train_ratio = ours.train_s / p.train_s
            p.mem_ratio = ours.peak_mb / p.peak_mb
            if out is not None and logits[0] is not None:
                p.rel_err = _rel_err(torch.tensor(out), torch.tensor(logits[0]))
                if p.rel_err > 1e-3:  # float32 reordering is far below this
                    _logger.warning('%dpx: %s disagrees with %s (relative error %.2g) on the same weights and input',
                                    size, p.candidate, ours.candidate, p.rel_err)
        points += row
    return points


def format_scale_table(points: Sequence[ScalePoint], train: bool = False) -> str:
    """A Markdown table of ``run_scale``'s points: one row per size and candidate, n/a cells with the reason in the
    last column. ``PerViT/this`` is PerViT's time (or peak memory) divided by the row's."""
    head = ['img', 'tokens', 'candidate', 'first s', 'steady s'] + (['train s'] if train else []) + ['peak MiB']
    head += (['train peak MiB'] if train else []) + ['build s', 'build GFLOP/s', '% GEMM']
    head += (['train build s'] if train else []) + ['PerViT/this time'] + (['PerViT/this train'] if train else [])
    head += ['PerViT/this peak', 'note']

    def cell(v: float, spec: str, na: str) -> str:
        return 'n/a' if na else _fmt(v, spec)

    rows = []
    for p in points:
        row = [str(p.img_size), str(p.tokens), p.candidate, cell(p.first_s, '.4g', p.na),
               cell(p.steady_s, '.4g', p.na)]
        row += [cell(p.train_s, '.4g', p.train_na)] if train else []
        row += [cell(p.peak_mb, '.0f', p.na)] + ([cell(p.train_peak_mb, '.0f', p.train_na)] if train else [])
        row += [_fmt(p.build_s, '.4g'), _fmt(p.build_gflops, '.3g'), _fmt(p.build_gemm_pct, '.3g')]
        row += [_fmt(p.train_build_s, '.4g')] if train else []
        row += [_fmt(p.ratio, '.3g')] + ([_fmt(p.train_ratio, '.3g')] if train else []) + [_fmt(p.mem_ratio, '.3g')]
        notes = ([f'n/a: {p.na}'] if p.na else []) + ([f'train n/a: {p.train_na}'] if train and p.train_na else [])
        row.append('; '.join(notes).replace('|', '/') or '-')
        rows.append(row)
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError('--scale-plot needs matplotlib: pip install timm-pervit[viz]') from e


def plot_scale(points: Sequence[ScalePoint], path: str, title: str = '') -> None:
    """Log-log plot of ``run_scale``'s points against the number of tokens: steady time (left) and peak memory
    (right) of every candidate; training (when measured) dashed. Needs matplotlib (``timm-pervit[viz]``)."""
    _require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global figure state, any backend

    fig = Figure(figsize=(11, 4.5), layout='constrained')
    ax_t, ax_m = fig.subplots(1, 2)
    names = list(dict.fromkeys(p.candidate for p in points))
    for i, name in enumerate(names):
        color = f'C{i % 10}'
        pts = [p for p in points if p.candidate == name]
        for attr_t, attr_m, style, suffix in (('steady_s', 'peak_mb', 'o-', ''),
                                              ('train_s', 'train_peak_mb', 's--', ' (train, batch 2)')):
            xs = [(p.tokens, getattr(p, attr_t), getattr(p, attr_m)) for p in pts
                  if not math.isnan(getattr(p, attr_t))]
            if xs:
                tok, t, m = zip(*xs)
                ax_t.plot(tok, t, style, color=color, label=name + suffix)
                ax_m.plot(tok, m, style, color=color, label=name + suffix)
    for ax, ylabel in ((ax_t, 'seconds per step (median)'), (ax_m, 'peak memory (MiB)')):
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('tokens (input size / 16, squared)')
        ax.set_ylabel(ylabel)
        ax.grid(True, which='both', alpha=0.3)
    ax_t.set_title('median time: inference batch 1, training step batch 2 (dashed)', fontsize='medium')
    ax_m.set_title('peak memory of the point\'s own process', fontsize='medium')
    ax_t.legend(fontsize='small')
    if title:
        fig.suptitle(title, fontsize='medium')
    fig.savefig(path, dpi=120)


def _build_model(args: argparse.Namespace, device: torch.device) -> PerViT:
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if not isinstance(kwargs, dict):
        raise ValueError(f'--model-kwargs must be a JSON object, got {args.model_kwargs!r}.')
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, **kwargs)
    if not isinstance(model, PerViT):
        raise ValueError(
            f'--model {args.model!r} is a {type(model).__name__}, not a PerViT: the reference only knows how to run '
            f'PerViT weights. Use pervit_tiny, pervit_small or pervit_medium.')
    if args.checkpoint:
        sd = load_checkpoint(args.checkpoint)  # official or timm layout, .pth or .safetensors
        model.load_state_dict(checkpoint_filter_fn(sd, model))
    return model.to(device)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='pervit-benchmark', description=__doc__.split('\n\n')[1].replace('\n', ' '),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='pervit_tiny', help='a PerViT model name (timm registry)')
    p.add_argument('--model-kwargs', default='', help='JSON object of extra create_model kwargs, e.g. a micro model')
    p.add_argument('--checkpoint', default='', help='optional weights (.safetensors or torch file, official or ours)')
    p.add_argument('--batch-size', '-b', type=int, default=32)
    p.add_argument('--img-size', type=int, nargs='+', default=[224], help='one or more input sizes (square)')
    p.add_argument('--device', default='cpu', help='cpu, cuda, cuda:1, ...')
    p.add_argument('--mode', choices=('infer', 'train', 'both'), default='infer',
                   help='infer: forward under no_grad; train: forward + backward + AdamW step')
    p.add_argument('--candidates', default='eager',
                   help='comma-separated candidates besides the reference: eager or options joined by "+" from '
                        f'{", ".join(CANDIDATE_OPTIONS)}')
    p.add_argument('--compile', action='store_true', help='add the torch.compile candidate')
    p.add_argument('--amp', action='store_true', help='add the bfloat16 autocast candidate')
    p.add_argument('--channels-last', action='store_true', help='add the channels-last input/stem candidate')
    p.add_argument('--int8', action='store_true',
                   help='add the dynamic int8 candidate (quantize_dynamic of every Linear; inference only)')
    p.add_argument('--official-repo', default='', metavar='PATH',
                   help='a checkout of the official code (github.com/juhongm999/pervit): adds its model, on the same '
                        'weights, as the "official" candidate (224px input only; needs einops)')
    p.add_argument('--peers', default='', metavar='NAME[,NAME...]',
                   help='timm models to time in the same rounds (e.g. deit_tiny_patch16_224,convit_tiny); not gated')
    p.add_argument('--baseline', default='reference',
                   help='candidate the ratios are taken against, e.g. official')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: leave the default)')
    p.add_argument('--warmup', type=int, default=2, help='warm-up steps per candidate (after the correctness check)')
    p.add_argument('--iters', type=int, default=10, help='timed rounds; each round runs every candidate once')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default='', metavar='PATH', help='also write the results as JSON ("-": stdout only)')
    add_progress_arguments(p, 'progress bar on stderr')
    p.add_argument('--no-roofline', action='store_true', help='skip timing the GEMM roofline')
    g = p.add_argument_group(
        'scaling with input size', '--scale runs PerViT, the explicit formula (reference), the official code '
        '(--official-repo) and the --peers at every size, each (candidate, size) in its own fresh process: batch 1 '
        'inference (first call and median), with --scale-train a batch 2 training step; --batch-size, --mode, '
        '--img-size and the candidate options do not apply')
    g.add_argument('--scale', default='', metavar='SIZE[,SIZE...]', help='input sizes (square), e.g. 224,448,672')
    g.add_argument('--scale-train', action='store_true', help='also time a batch 2 training step (forward, '
                   'backward, SGD step)')
    g.add_argument('--scale-plot', default='', metavar='PATH', help='write a log-log plot of time and peak memory '
                   'against tokens (PNG; needs matplotlib: pip install timm-pervit[viz])')
    g.add_argument('--scale-mem-limit', type=float, default=0., metavar='MiB',
                   help='skip (n/a) points the explicit formula or the official code is estimated to need more '
                        f'memory for (0: {100 * SCALE_MEMORY_SHARE:.0f}%% of the memory free at the start)')
    g.add_argument('--scale-timeout', type=float, default=1800., metavar='S',
                   help='seconds one (candidate, size) process may run before it is stopped (n/a)')
    p.add_argument('--gate-float32', action='store_true',
                   help='check candidates against the float32 reference instead of a float64 run of it (the float64 '
                        'run needs about twice the reference\'s step memory)')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stderr)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        raise SystemExit('--batch-size and --iters must be >= 1 and --warmup >= 0')
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'--device {args.device}: CUDA is not available on this machine; use --device cpu.')
    if args.scale:
        return _main_scale(args, argv, device)
    names = [n for n in args.candidates.split(',') if n.strip()]
    flags = ((args.compile, 'compile'), (args.amp, 'amp'), (args.channels_last, 'channels_last'), (args.int8, 'int8'))
    names += [n for flag, n in flags if flag]
    official_code = None
    try:
        candidates = parse_candidates(
            names, official=bool(args.official_repo), peers=[n for n in args.peers.split(',') if n.strip()])
        if args.baseline not in [c.name for c in candidates]:
            raise ValueError(f'--baseline {args.baseline!r} is not a candidate of this run: use one of '
                             f'{", ".join(c.name for c in candidates)}')
        base = _build_model(args, device)
        if args.official_repo:
            official_code = load_official_code(args.official_repo)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    rooflines = None
    if not args.no_roofline:
        dtypes = {torch.float32} | ({torch.bfloat16} if any(c.amp for c in candidates) else set())
        _logger.info('timing the GEMM roofline (%s)', ', '.join(str(dt) for dt in dtypes))
        rooflines = {dt: gemm_roofline(device, dt) for dt in dtypes}
    modes = ('infer', 'train') if args.mode == 'both' else (args.mode,)
    results: List[BenchmarkResult] = []
    try:
        for mode in modes:
            for size in args.img_size:
                results += run_benchmark(
                    base, candidates, size, args.batch_size, mode, device, warmup=args.warmup, iters=args.iters,
                    rooflines=rooflines, progress=args.progress, seed=args.seed,
                    gate_float64=not args.gate_float32, official_code=official_code, baseline=args.baseline)
    except CorrectnessError as e:
        print(f'error: correctness check failed: {e}', file=sys.stderr)
        return 1
    meta = dict(
        model=args.model, model_kwargs=args.model_kwargs, device=str(device), threads=torch.get_num_threads(),
        torch=torch.__version__, timm=timm.__version__, command='pervit-benchmark ' + ' '.join(
            sys.argv[1:] if argv is None else argv),
        gemm_roofline_gflops={str(k).replace('torch.', ''): v for k, v in (rooflines or {}).items()},
        official_repo=str(official_code.path) if official_code else None, baseline=args.baseline,
        device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else _cpu_name(),
    )
    payload = dict(meta=meta, results=[r.to_dict() for r in results])
    if args.json and args.json != '-':
        with open(args.json, 'w') as f:
            json.dump(payload, f, indent=2)
    if args.json == '-':
        print(json.dumps(payload, indent=2))
    else:
        roof = ', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in meta['gemm_roofline_gflops'].items())
        print(f'{meta["device_name"]}, {meta["threads"]} threads, torch {meta["torch"]}; GEMM roofline: {roof or "-"}; '
              f'ratios against {args.baseline}')
        print(format_table(results, device))
    return 0


def _main_scale(args: argparse.Namespace, argv: Optional[List[str]], device: torch.device) -> int:
    """``--scale``: one table (and optionally a plot and JSON) of every candidate at every input size."""
    try:
        sizes = [int(s) for s in args.scale.split(',') if s.strip()]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        print(f'error: --scale takes positive input sizes separated by commas, e.g. 224,448, got {args.scale!r}',
              file=sys.stderr)
        return 2
    peers = [n.strip() for n in args.peers.split(',') if n.strip()]
    try:
        parse_candidates([], peers=peers)  # names timm does not know
        _build_model(args, torch.device('cpu'))
        if args.official_repo:
            load_official_code(args.official_repo)
        if args.scale_plot:
            _require_matplotlib()
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    gemm = float('nan') if args.no_roofline else gemm_roofline(device, torch.float32)
    points = run_scale(
        args.model, sizes, peers, model_kwargs=args.model_kwargs, checkpoint=args.checkpoint,
        official_repo=args.official_repo, device=device, threads=args.threads, iters=args.iters, warmup=args.warmup,
        train=args.scale_train, seed=args.seed, mem_limit_mb=args.scale_mem_limit or None,
        timeout_s=args.scale_timeout, gemm_gflops=gemm)
    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    meta = dict(
        model=args.model, model_kwargs=args.model_kwargs, device=str(device), threads=threads,
        torch=torch.__version__, timm=timm.__version__, command='pervit-benchmark ' + ' '.join(
            sys.argv[1:] if argv is None else argv), gemm_fp32_gflops=None if math.isnan(gemm) else gemm,
        batch=SCALE_BATCH, iters=args.iters, warmup=args.warmup,
        device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else _cpu_name(),
    )
    payload = dict(meta=meta, rows=[p.to_dict() for p in points])
    if args.json and args.json != '-':
        with open(args.json, 'w') as f:
            json.dump(payload, f, indent=2)
    heading = (f'{meta["device_name"]}, {threads} threads, torch {meta["torch"]}; fp32 GEMM: '
               f'{_fmt(gemm, ".0f")} GFLOP/s; inference batch {SCALE_BATCH["infer"]}'
               + (f', training batch {SCALE_BATCH["train"]}' if args.scale_train else ''))
    if args.scale_plot:
        plot_scale(points, args.scale_plot, title=f'{args.model}: {heading}')
    if args.json == '-':
        print(json.dumps(payload, indent=2))
    else:
        print(heading)
        print(format_scale_table(points, train=args.scale_train))
    return 0


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            m = re.search(r'^model name\s*:\s*(.+)$', f.read(), re.MULTILINE)
        return m.group(1).strip() if m else 'CPU'
    except OSError:
        return 'CPU'


if __name__ == '__main__':
    sys.exit(main())
