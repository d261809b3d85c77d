"""Speed of the default paths of two checkouts, alternating fresh processes (A/B of a change).

    for r in 1 2 3; do for tree in ../old-checkout .; do PYTHONPATH=$tree python docs/ab_default_paths.py; done; done

Each process times pervit_tiny at 224 px, 2 threads: inference at batch 32 (median of 5) and batch 1 (median of 30)
under ``torch.no_grad()``, and a training step at batch 8 (forward + backward, median of 4), and prints which
checkout it imported.
"""
import os
import statistics
import time

import timm
import torch

import timm_pervit


def _median_seconds(fn, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = timm.create_model('pervit_tiny').eval()
    x32, x1, x8 = (torch.randn(b, 3, 224, 224) for b in (32, 1, 8))
    with torch.no_grad():
        model(x32)
        infer32 = _median_seconds(lambda: model(x32), 5)
        model(x1)
        infer1 = _median_seconds(lambda: model(x1), 30)
    model.train()
    model(x8).logsumexp(-1).mean().backward()
    train8 = _median_seconds(lambda: model(x8).logsumexp(-1).mean().backward(), 4)
    tree = os.path.dirname(os.path.dirname(os.path.abspath(timm_pervit.__file__)))
    print(f'{tree}: infer b32 {infer32:.3f} s, infer b1 {infer1 * 1e3:.1f} ms, train b8 {train8:.3f} s')


if __name__ == '__main__':
    main()
