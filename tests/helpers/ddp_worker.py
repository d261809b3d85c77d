"""One rank of the DDP test (tests/integrations/test_ddp.py), started by ``torchrun`` like timm's train.py.

Set-up the way train.py does it: ``timm.utils.init_distributed_device`` (gloo on CPU, from torchrun's environment),
``create_model``, DistributedDataParallel (``find_unused_parameters=False``), the recipe's repeated-augmentation
sampler through ``create_loader(distributed=True, num_aug_repeats=3)``, ``--grad-checkpointing``, ``--dist-bn reduce``
and ``--sync-bn`` conversion. Each rank starts from its own random init and its own cached position attention;
everything it ends with is written to ``--out`` for the test to compare across ranks.

Usage: ``torchrun --nproc_per_node=2 tests/ddp_worker.py --data <image folder> --out <dir> --model-kwargs <JSON>``
(the test passes the micro architecture of tests/conftest.py as ``--model-kwargs``).
"""
import argparse
import copy
import json
import os
from typing import Dict

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import create_dataset, create_loader
from timm.layers import convert_sync_batchnorm
from timm.optim import create_optimizer_v2
from timm.utils import distribute_bn, init_distributed_device
from torch.nn.parallel import DistributedDataParallel

from timm_pervit.tools.recipes import SAFE_AUGMENTATION, augmentation_problem


def fresh_eval(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(model).eval()
    ref.pos_attn.clear_cache()
    with torch.no_grad():
        return ref(x)


def gather_equal(t: torch.Tensor) -> bool:
    """True when every rank holds exactly the same tensor."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--data', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--model-kwargs', type=json.loads, default={}, help='timm.create_model arguments as JSON')
    args = parser.parse_args()
    device = init_distributed_device(args)  # train.py's call: reads RANK/WORLD_SIZE/MASTER_* set by torchrun
    rank = args.rank
    report: Dict[str, object] = dict(rank=rank, world_size=args.world_size, distributed=args.distributed,
                                     backend=dist.get_backend())

    torch.manual_seed(1000 + rank)  # a different init on every rank: DDP must broadcast rank 0's
    model = timm.create_model('pervit_tiny', num_classes=3, drop_path_rate=0.1, **args.model_kwargs).to(device)
    x_eval = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))  # the same on every rank
    with torch.no_grad():
        model.eval()(x_eval)  # this rank's own init now sits in the position-attention cache
    model.train()
    ddp = DistributedDataParallel(model, broadcast_buffers=True, find_unused_parameters=False)
    with torch.no_grad():
        out_start = model.eval()(x_eval)
    report['start_equal_across_ranks'] = gather_equal(out_start)
    report['start_matches_fresh'] = torch.allclose(out_start, fresh_eval(model, x_eval), rtol=1e-5, atol=1e-6)

    dataset = create_dataset('', root=args.data, split='train', is_training=True)
    # the recipe's RandAugment, or the one the recipe command advises where timm + Pillow 13 crash on it
    aa = 'rand-m9-mstd0.5-inc1' if augmentation_problem() is None else SAFE_AUGMENTATION
    loader = create_loader(
        dataset, input_size=(3, 48, 48), batch_size=4, is_training=True, auto_augment=aa,
        re_prob=0.25, re_mode='pixel', interpolation='bicubic', num_aug_repeats=3, distributed=True,
        num_workers=0, device=device, use_prefetcher=False, persistent_workers=False)  # timm < 1.0.29: True
    report['sampler'] = type(loader.sampler).__name__
    optimizer = create_optimizer_v2(model, opt='adamw', lr=2e-3, weight_decay=0.05, layer_decay=0.65)
    steps, all_grads = 0, True
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        model.set_grad_checkpointing(epoch == 1)  # train.py --grad-checkpointing under DDP
        model.train()
        for i, (x, y) in enumerate(loader):
            if i == 3:  # a few steps per epoch are enough (the data set has 258 images for the sampler's sake)
                break
            loss = F.cross_entropy(ddp(x), y, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            all_grads &= all(p.grad is not None for p in model.parameters())
            optimizer.step()
            steps += 1
    report['steps'] = steps
    report['all_params_have_grads'] = all_grads

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    report['params_equal_across_ranks'] = gather_equal(flat)
    # BatchNorm statistics of the stem are per-rank after the last step; train.py's --dist-bn reduce (the default)
    # averages them before evaluating
    distribute_bn(model, args.world_size, reduce=True)
    report['bn_stats_equal_across_ranks'] = gather_equal(torch.cat([b.flatten().float() for b in model.buffers()]))
    with torch.no_grad():
        out_end = model.eval()(x_eval)  # the cache must be rebuilt from the trained weights
    report['end_equal_across_ranks'] = gather_equal(out_end)
    report['end_matches_fresh'] = torch.allclose(out_end, fresh_eval(model, x_eval), rtol=1e-5, atol=1e-6)
    report['end_differs_from_start'] = not torch.allclose(out_end, out_start)

    # --sync-bn: train.py converts before wrapping in DDP
    plain = timm.create_model('pervit_tiny', num_classes=3, **args.model_kwargs).to(device)
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    report['sync_bn_modules'] = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    report['plain_bn_left'] = sum(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    with torch.no_grad():
        report['sync_bn_eval_matches'] = torch.allclose(
            synced.eval()(x_eval), fresh_eval(plain, x_eval), rtol=1e-5, atol=1e-6)
    synced.train()
    try:
        ddp_synced = DistributedDataParallel(synced, find_unused_parameters=False)
    except ValueError as e:  # torch's DDP refuses SyncBatchNorm in a CPU module; the test checks it is that refusal
        report['sync_bn_train'] = dict(device=device.type, error=f'{type(e).__name__}: {e}')
    else:
        F.cross_entropy(ddp_synced(x_eval), torch.tensor([0, 1])).backward()
        synced_flat = torch.cat([p.grad.flatten() for p in synced.parameters()])
        report['sync_bn_train'] = dict(device=device.type, grads_equal_across_ranks=gather_equal(synced_flat))

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(args.out, f'rank{rank}.safetensors'))
    save_file({'x': x_eval, 'out': out_end}, os.path.join(args.out, f'rank{rank}_eval.safetensors'))
    with open(os.path.join(args.out, f'rank{rank}.json'), 'w') as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
