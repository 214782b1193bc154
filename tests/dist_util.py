"""Process plumbing for the torch.distributed tests: gloo workers on the CPU, spawned per test.

`spawn(fn, *args, world=2)` runs fn(rank, *args) in `world` processes; a failed assertion in a
worker fails the test with its traceback. `count_all_reduces()` makes `all_reduces()` count the
calls of dist.all_reduce (amos_fused.distributed calls it through the module).
"""
import datetime
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 300  # per test


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, port, world, fn, args):
    torch.set_num_threads(1)  # the workers share the CI box's two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, *args, world=2):
    """Run fn(rank, *args) in `world` processes; raise if one fails or they outlive TIMEOUT_S."""
    # forkserver: workers fork from a server that imported torch once, instead of importing it
    # again per worker and test (spawn); nothing is inherited from the pytest process
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed.fsdp", "amos_fused"])
    ctx = mp.start_processes(_entry, args=(_free_port(), world, fn, args), nprocs=world, join=False,
                             start_method="forkserver")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
    try:
        while not ctx.join(timeout=5):
            if datetime.datetime.now() > deadline:
                raise TimeoutError(f"workers still running after {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


_ALL_REDUCES = [0]


def count_all_reduces():
    """Count the calls of dist.all_reduce from now on in this process (see `all_reduces`)."""
    if getattr(dist.all_reduce, "_counted", False):
        return
    original = dist.all_reduce

    def counted(*args, **kwargs):
        _ALL_REDUCES[0] += 1
        return original(*args, **kwargs)

    counted._counted = True
    dist.all_reduce = counted


def all_reduces():
    return _ALL_REDUCES[0]


def full(t):
    """The global value of a DTensor (a collective: every rank calls it); other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
