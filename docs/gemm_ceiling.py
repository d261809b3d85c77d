"""Prints the ceiling quoted in docs/benchmarks.md: how fast a PerViT step could be if every counted FLOP ran at the
rate torch reaches on the model's own Linear layers (its largest matrix multiplies) and nothing else took any time,
next to the official code's step and this package's, timed alternately in one process (CPU).

    python docs/gemm_ceiling.py --official-repo ../pervit [--mode train|infer] [--batch-size 32] [--rounds 5]

The Linear layers are timed alone on their own shapes (forward; in training also the two backward products), so the
rate is the best this torch build does on exactly those matrices; both implementations run the same Linears on the
same torch kernels. Run from the repository root (needs ``pip install einops`` for the official code).
"""
import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import timm_pervit  # noqa: F401
from timm_pervit.tools.benchmark import count_macs, gemm_roofline
from timm_pervit.tools.official import build_official_model, load_official_code

p = argparse.ArgumentParser()
p.add_argument('--official-repo', required=True)
p.add_argument('--mode', default='train', choices=('train', 'infer'))
p.add_argument('--batch-size', type=int, default=32)
p.add_argument('--rounds', type=int, default=5)
p.add_argument('--threads', type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
train = args.mode == 'train'
ours = timm.create_model('pervit_tiny').train(train)
official = build_official_model(load_official_code(args.official_repo), ours, args.mode)
x, y = torch.randn(args.batch_size, 3, 224, 224), torch.randint(0, 1000, (args.batch_size,))
optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-6) for m in (ours, official)} if train else {}


def forward_backward(model: torch.nn.Module) -> None:
    if train:
        F.cross_entropy(model(x), y).backward()
    else:
        with torch.no_grad():
            model(x)


def step(model: torch.nn.Module) -> None:
    forward_backward(model)
    if train:
        optimizers[id(model)].step()
        optimizers[id(model)].zero_grad(set_to_none=True)


def linear_shapes():
    """(rows, in, out, bias) of every Linear call of one forward, from the module inputs."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, a, o: shapes.append((a[0].numel() // a[0].shape[-1], m.in_features,
                                                                      m.out_features, m.bias is not None)))
             for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        ours(x)
    for h in hooks:
        h.remove()
    return shapes


def time_linears(shapes) -> float:
    """Seconds for the Linear products alone: forward, and in training grad-input and grad-weight."""
    total = 0.
    for rows, k, n, bias in shapes:
        a = torch.randn(rows, k, requires_grad=train)
        w = torch.randn(n, k, requires_grad=train)
        b = torch.randn(n, requires_grad=train) if bias else None
        g = torch.randn(rows, n)
        best = float('inf')
        for _ in range(3):
            t = time.perf_counter()
            out = F.linear(a, w, b)
            if train:
                out.backward(g)
            best = min(best, time.perf_counter() - t)
            a.grad = w.grad = None
        total += best
    return total


for m in (ours, official):  # warm-up; at inference this also builds the position attention both models keep
    step(m)
shapes = linear_shapes()
linear_flops = sum(2 * r * k * n for r, k, n, _ in shapes) * (3 if train else 1)
macs = {name: count_macs(lambda: forward_backward(m)) for name, m in (('ours', ours), ('official', official))}
for m in (ours, official):
    m.zero_grad(set_to_none=True)
times = {'ours': [], 'official': [], 'linears': []}
for _ in range(args.rounds):
    for name, m in (('ours', ours), ('official', official)):
        t = time.perf_counter()
        step(m)
        times[name].append(time.perf_counter() - t)
    times['linears'].append(time_linears(shapes))
roof = gemm_roofline(torch.device('cpu'), torch.float32)
med = {k: statistics.median(v) for k, v in times.items()}
rate = linear_flops / med['linears'] / 1e9
b = args.batch_size
print(f'{args.mode}, pervit_tiny, batch {b}, 224 px, {args.threads} threads, torch {torch.__version__}, '
      f'{args.rounds} alternating rounds')
print(f'GEMM roofline (2048^3): {roof:.0f} GFLOP/s; the model\'s Linears alone: {rate:.0f} GFLOP/s '
      f'({100 * rate / roof:.0f}% of it)')
for name in ('official', 'ours'):
    ips = [b / t for t in times[name]]
    gflops = 2 * macs[name] / med[name] / 1e9
    print(f'{name:8s} {statistics.median(ips):5.1f} img/s ({min(ips):.1f}-{max(ips):.1f}), {macs[name] / b / 1e9:.3f} '
          f'GMACs/img, {gflops:.0f} GFLOP/s = {100 * gflops / rate:.0f}% of the Linears\' rate')
ceiling = b / (2 * macs['ours'] / (rate * 1e9))
print(f'ceiling: every FLOP of ours at the Linears\' rate, nothing else: {ceiling:.1f} img/s = '
      f'{ceiling / (b / med["official"]):.2f}x the official median')
