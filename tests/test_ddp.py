"""DistributedDataParallel on CPU with gloo: two ranks started by a real ``torchrun``, as train.py is run.

tests/ddp_worker.py does the distributed part (see its docstring); this test prepares the data, launches it, and
checks what each rank wrote: both ranks ended with identical weights and outputs, every parameter got a gradient
(no unused-parameter error with ``find_unused_parameters=False``), the position-attention caches were rebuilt after
the broadcast and after training, ``--sync-bn`` conversion works (its training step needs GPUs: on CPU torch refuses
it with its documented error).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from .conftest import MICRO_ARCH

WORKER = Path(__file__).with_name('ddp_worker.py')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _image_folder(root: Path) -> Path:
    # 258 images: timm < 1.0.31's RepeatAugSampler (--aug-repeats) selects no sample at all from fewer than 256
    rng = np.random.default_rng(0)
    for c in range(3):
        folder = root / 'train' / f'class{c}'
        folder.mkdir(parents=True)
        for i in range(86):
            img = rng.integers(0, 90, (48, 48, 3))
            img[..., c] += 140
            Image.fromarray(img.astype(np.uint8)).save(folder / f'{i}.png')
    return root


@pytest.mark.slow
def test_ddp_gloo_two_ranks(tmp_path):
    data = _image_folder(tmp_path / 'data')
    out = tmp_path / 'out'
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'PYTHONPATH')}
    env.update(OMP_NUM_THREADS='1', MASTER_ADDR='127.0.0.1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', '--nproc_per_node=2',
           '--master_addr=127.0.0.1', f'--master_port={_free_port()}',
           str(WORKER), '--data', str(data), '--out', str(out), '--model-kwargs', json.dumps(MICRO_ARCH)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f'torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}'

    reports = [json.loads((out / f'rank{r}.json').read_text()) for r in range(2)]
    for r, rep in enumerate(reports):
        assert rep['rank'] == r and rep['world_size'] == 2 and rep['distributed'] and rep['backend'] == 'gloo'
        assert rep['sampler'] == 'RepeatAugSampler'  # the recipe's --aug-repeats 3
        assert rep['steps'] >= 2 and rep['all_params_have_grads']
        # after DDP's broadcast, the rank whose cache held its own init recomputed it
        assert rep['start_equal_across_ranks'] and rep['start_matches_fresh']
        assert rep['params_equal_across_ranks'] and rep['bn_stats_equal_across_ranks']  # after --dist-bn reduce
        assert rep['end_equal_across_ranks'] and rep['end_matches_fresh'] and rep['end_differs_from_start']
        assert rep['sync_bn_modules'] == 4 and rep['plain_bn_left'] == 0 and rep['sync_bn_eval_matches']
        # --sync-bn training on CPU: torch's DistributedDataParallel refuses SyncBatchNorm outside GPU modules, with
        # exactly this error (any other failure, or a torch that accepts it, must be looked at)
        refusal = dict(device='cpu', error='ValueError: SyncBatchNorm layers only work with GPU modules')
        assert rep['sync_bn_train'] == refusal
    assert reports[0]['steps'] == reports[1]['steps']

    # from outside: both ranks saved the same weights, and a fresh model with them reproduces their outputs
    states = [load_file(str(out / f'rank{r}.safetensors')) for r in range(2)]
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    model = timm.create_model('pervit_tiny', num_classes=3, **MICRO_ARCH)
    model.load_state_dict(states[0])
    for r in range(2):
        saved = load_file(str(out / f'rank{r}_eval.safetensors'))
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(saved['x']), saved['out'], rtol=1e-5, atol=1e-6)
