"""One rank of tests/integrations/test_ddp.py::test_ddp_gradient_layout, started by ``torchrun`` (gloo on CPU).

A few plain DistributedDataParallel training steps of the micro PerViT (``--model-kwargs``), with and without
gradient checkpointing, recording every Python warning they raise and the parameters whose gradient strides differ
from the parameter's (what DDP's reducer reports as "Grad strides do not match bucket view strides", once per
process; its C++ warning reaches Python as a UserWarning, anything left on stderr is checked by the test). Each rank
starts from its own random init (DDP broadcasts rank 0's) and its own data; the report goes to ``--out``.

Usage: ``torchrun --nproc_per_node=2 tests/ddp_layout_worker.py --out <dir> --model-kwargs <JSON>``
"""
import argparse
import json
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import timm_pervit
from timm_pervit import PerViT

from ddp_worker import gather_equal  # the other DDP worker, beside this script (sys.path[0] when torchrun starts it)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', required=True)
    parser.add_argument('--model-kwargs', type=json.loads, default={}, help='PerViT arguments as JSON')
    args = parser.parse_args()
    dist.init_process_group('gloo')  # RANK/WORLD_SIZE/MASTER_* from torchrun
    rank = dist.get_rank()

    torch.manual_seed(1000 + rank)  # a different init on every rank: DDP must broadcast rank 0's
    model = PerViT(**args.model_kwargs).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(rank)  # each rank its own batches
        mismatched = set()
        steps = 0
        for checkpointing in (False, True):
            model.set_grad_checkpointing(checkpointing)
            for _ in range(2):
                x = torch.randn(2, 3, 64, 64, generator=gen)
                y = torch.randint(0, model.num_classes, (2,), generator=gen)
                optimizer.zero_grad()  # set_to_none: every step's gradients are fresh tensors from the backward
                F.cross_entropy(ddp(x), y).backward()
                mismatched.update(n for n, p in model.named_parameters() if p.grad.stride() != p.stride())
                optimizer.step()
                steps += 1
    report = dict(
        rank=rank, world_size=dist.get_world_size(), steps=steps, module_file=timm_pervit.__file__,
        warnings=[f'{w.category.__name__}: {w.message}' for w in caught],
        mismatched_strides=sorted(mismatched),
        params_equal_across_ranks=gather_equal(torch.cat([p.detach().flatten() for p in model.parameters()])),
    )
    with open(os.path.join(args.out, f'rank{rank}.json'), 'w') as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
