"""CPU time of the training attention's backward (``PeripheralSdpaCpu``) for one block of pervit_tiny's shape.

    python docs/attention_backward.py 1764            # tokens: 196 at 224 px, 1764 at 672 px, 4096 at 1024 px
    PYTHONPATH=/path/to/other/checkout python docs/attention_backward.py 1764   # the same on another commit

Batch 2, 4 heads of 56 channels, float32, one intra-op thread by default; prints the min-max CPU time
(``time.process_time``, robust to other load on the machine) of three backward calls after one warm-up, and
checksums of the qkv and mask gradients, which must be the same on every commit that computes the same function.
"""
import argparse
import time

import torch

from timm_pervit.layers.attention import PeripheralSdpaCpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('tokens', type=int)
    p.add_argument('--threads', type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, heads, dim, n = 2, 4, 56, args.tokens
    qkv = torch.randn(batch, n, 3, heads, dim, requires_grad=True)
    mask = torch.randn(1, heads, n, n, requires_grad=True)
    grad = torch.randn(batch, heads, n, dim)
    times = []
    for _ in range(4):
        qkv.grad = mask.grad = None
        out = PeripheralSdpaCpu.apply(qkv, mask, dim ** -0.5)
        start = time.process_time()
        out.backward(grad)
        times.append(time.process_time() - start)
    print(f'{n} tokens: backward {min(times[1:]):.3f}-{max(times[1:]):.3f} s CPU; checksums '
          f'{qkv.grad.double().abs().sum():.6e} {mask.grad.double().abs().sum():.6e}')


if __name__ == '__main__':
    main()
