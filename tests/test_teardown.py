"""A finished training leaves no process-group threads behind: a gloo worker still alive when the
interpreter exits can abort the process after its work is done ("terminate called without an active
exception"), which torchrun reports as a failed run."""
import os
import socket

import torch.multiprocessing as mp

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def native_threads() -> list[str]:
    return [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]


def _rank(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    from distrec.train import main

    code = main(argv)
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{code}\n" + "\n".join(native_threads()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_training_on_two_ranks_joins_the_gloo_threads_before_exit(small_data, tmp_path):
    cfg_path, data = small_data
    argv = ["--config", str(cfg_path), f"--data.path={data}", f"--logging.dir={tmp_path / 'logs'}",
            "--train.max_steps=4", "--eval.max_rows=500", f"--checkpoint.dir={tmp_path / 'ckpt'}"]
    out = str(tmp_path / "threads")
    mp.start_processes(_rank, args=(2, free_port(), argv, out), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        code, *threads = open(f"{out}.{rank}").read().splitlines()
        assert code == "0"
        assert not [t for t in threads if t in GLOO_THREADS], f"rank {rank} still runs {threads}"
