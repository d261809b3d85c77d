"""Peak memory (RSS) and time of one inference at a large input, in a fresh process per point.

    python docs/peak_memory.py pervit_tiny 896          # or deit_tiny_patch16_224 (dynamic_img_size)

The number reported is the process's peak resident set size after one ``torch.no_grad()`` forward of one image: it
includes torch itself and the weights, so compare models measured the same way.
"""
import argparse
import resource
import time

import timm
import torch

import timm_pervit  # noqa: F401  (registers the models where the start-up hook is off)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('model')
    p.add_argument('size', type=int)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kwargs = dict(dynamic_img_size=True) if args.model.startswith(('deit', 'vit')) else {}
    model = timm.create_model(args.model, **kwargs).eval()
    x = torch.randn(1, 3, args.size, args.size)
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f'{args.model} {args.size}px: {time.perf_counter() - start:.2f} s, peak RSS {peak:.2f} GB')


if __name__ == '__main__':
    main()
