"""One eval model serves many threads, and a forked child (DataLoader workers) never inherits a held cache lock."""
import sys
import threading

import torch

from tests.conftest import make_micro


def test_concurrent_inference_from_many_threads():
    model = make_micro(pos_cache_size=2).eval()
    sizes = [(32, 32), (48, 32), (32, 64), (64, 48), (48, 48)]
    inputs = {s: torch.randn(1, 3, *s) for s in sizes}
    with torch.no_grad():
        expected = {s: model(x) for s, x in inputs.items()}
    errors, mismatches = [], []
    n_threads, n_calls = 8, 100

    def work(i):
        try:
            for j in range(n_calls):
                s = sizes[(i + j) % len(sizes)]
                with torch.no_grad():
                    out = model(inputs[s])
                if not torch.equal(out, expected[s]):
                    mismatches.append(s)
        except Exception as e:  # noqa: BLE001 - every failure is collected and reported
            errors.append(repr(e))

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert errors == [] and mismatches == [], (errors[:3], len(errors), len(mismatches))
    assert model.pos_attn.cache_info()['entries'] <= 2


def test_cache_bookkeeping_is_atomic_under_adversarial_scheduling():
    """Eight threads insert and evict (five grids through two entries), read ``cache_info()`` (which walks the
    cache) and clear the cache, with a thread switch forced every microsecond: no error, every result exact, and the
    bounds hold at every observation."""
    model = make_micro(pos_cache_size=2).eval()
    pos = model.pos_attn
    grids = [(2, 2), (2, 3), (3, 2), (3, 3), (2, 4)]
    with torch.no_grad():
        expected = {g: pos.compute(*g) for g in grids}
    errors, mismatches, broken = [], [], []

    def work(i):
        try:
            for j in range(30):
                g = grids[(i + j) % len(grids)]
                with torch.no_grad():
                    out = pos(*g)
                if not all(torch.equal(a, b) for a, b in zip(out, expected[g])):
                    mismatches.append(g)
                info = pos.cache_info()
                if not (info['entries'] == len(info['grids']) <= 2 and info['bytes'] <= info['max_bytes']):
                    broken.append(info)
                if i == 0 and j % 10 == 9:
                    pos.clear_cache()
        except Exception as e:  # noqa: BLE001 - every failure is collected and reported
            errors.append(repr(e))

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert errors == [] and mismatches == [] and broken == [], (errors[:3], len(mismatches), broken[:2])


def test_a_forked_child_does_not_inherit_a_held_cache_lock():
    """A fork while another thread holds the cache lock (a background inference thread plus DataLoader fork
    workers): the child gets a lock and a cache of its own and runs."""
    import multiprocessing
    import threading
    model = make_micro().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    held, release = threading.Event(), threading.Event()

    def hold():
        with model.pos_attn.cache_lock:  # what a thread inside the cache's bookkeeping holds
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    try:
        ctx = multiprocessing.get_context('fork')
        queue = ctx.Queue()
        child = ctx.Process(target=_child_inference, args=(model, x, queue))
        child.start()
        child.join(60)
        alive = child.is_alive()
        if alive:
            child.kill()
    finally:
        release.set()
        thread.join()
    assert not alive, 'the forked child blocked on the cache lock'
    assert child.exitcode == 0
    torch.testing.assert_close(torch.tensor(queue.get(timeout=10)), ref, rtol=0, atol=0)


def _child_inference(model, x, queue):
    torch.set_num_threads(1)  # as DataLoader workers do: torch's thread pool does not survive a fork
    with torch.no_grad():
        queue.put(model(x).tolist())  # plain numbers: a shared tensor would die with the child
