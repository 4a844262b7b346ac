"""Run a function on N real ranks (processes) joined by a gloo process group.

    results = run_ranks(2, my_fn, arg)     # my_fn(rank, world, arg) on each rank; returns its results

``my_fn`` must be a module-level function (spawned processes import it). An exception on any rank fails
the call with that rank's traceback.
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sharding.comm import close_process_group, init_process_group


def _entry(rank: int, world: int, store_dir: str, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(store_dir, "store"), world)
    init_process_group("gloo", rank=rank, world_size=world, store=store)
    try:
        torch.save(fn(rank, world, *args), os.path.join(store_dir, f"result{rank}.pt"))
    finally:
        close_process_group()


def run_ranks(world: int, fn, *args) -> list:
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_entry, args=(world, d, fn, args), nprocs=world, join=True, start_method="spawn")
        return [torch.load(os.path.join(d, f"result{r}.pt"), weights_only=False) for r in range(world)]
