"""`distrec ps`: start the coordinator, S servers and W workers, on one machine or several.

    distrec ps --workers 2 --servers 1 --config configs/demo.toml --logging.dir=runs/ps/logs
    # several machines: the same config and data path everywhere, one coordinator at ADDR:PORT
    distrec ps --role coordinator --config configs/demo.toml --ps.master_addr=ADDR --ps.master_port=PORT
    distrec ps --role server --index 0 --config configs/demo.toml --ps.master_addr=ADDR --ps.master_port=PORT
    distrec ps --role worker --index 1 --config configs/demo.toml --ps.master_addr=ADDR --ps.master_port=PORT

RPC ranks: coordinator 0, server s at 1 + s, worker w at 1 + S + w. The coordinator creates the server
objects and starts each worker's loop over RPC; servers and workers only serve until it is done.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.rpc as rpc
import torch.multiprocessing as mp

from distrec.config import Config, ConfigError, dump_toml, load_config, table_specs
from distrec.data.manifest import read_manifest
from distrec.tools.ps.coordinator import Reporter, Watchdog, evaluate, fail, fail_process, label
from distrec.tools.ps.rows import Partition
from distrec.tools.ps.server import ParamServer
from distrec.tools.ps.worker import ServerClient, run_worker
from distrec.trainer.logs import MetricsLog, write_resolved_config
from sharding.files import atomic_write


def names(cfg: Config) -> list[str]:
    """RPC names in rank order."""
    return ["coordinator", *[f"server{s}" for s in range(cfg.ps.servers)],
            *[f"worker{w}" for w in range(cfg.ps.workers)]]


def rendezvous(cfg: Config) -> str:
    """Where the processes meet: the coordinator's TCP store, across machines."""
    return f"tcp://{cfg.ps.master_addr}:{cfg.ps.master_port}"


def init_rpc(name: str, cfg: Config, init_method: str) -> None:
    # rpc.init_rpc itself uses a deprecated gloo call; the warning says nothing to a user.
    warnings.filterwarnings("ignore", message="You are using a Backend")
    if cfg.ps.master_addr.startswith("127.") or cfg.ps.master_addr in ("localhost", "::1"):
        # One machine: every listening socket on loopback. RPC runs pickled calls from any peer that
        # reaches its ports, so across machines it needs a trusted network (README, Security).
        os.environ.setdefault("TP_SOCKET_IFNAME", "lo")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    options = rpc.TensorPipeRpcBackendOptions(rpc_timeout=cfg.ps.timeout_s, num_worker_threads=16,
                                              init_method=init_method)
    rpc.init_rpc(name, rank=names(cfg).index(name), world_size=len(names(cfg)), rpc_backend_options=options)


def serve(name: str, cfg: Config, init_method: str, stderr_path: str | None = None) -> None:
    """A server or worker process: join the RPC group, answer calls until the coordinator is done.
    If the coordinator stops answering, exit non-zero instead of waiting for it forever."""
    torch.set_num_threads(cfg.ps.threads_per_process)
    if stderr_path:  # a local child: its RPC warnings and tracebacks go to a file, the coordinator says what happened
        os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    init_rpc(name, cfg, init_method)
    threading.Thread(target=watch_coordinator, args=(name, cfg.ps.timeout_s), daemon=True).start()
    rpc.shutdown()  # returns once every process has called it, i.e. when the coordinator is done


def watch_coordinator(name: str, timeout_s: float) -> None:
    while True:
        time.sleep(min(5.0, timeout_s / 4))
        try:
            rpc.rpc_sync("coordinator", os.getpid, timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure: the coordinator is gone
            time.sleep(3.0)  # a normal shutdown ends this process meanwhile; only a real loss gets here
            print(f"distrec ps: error: {label(name)}: lost the coordinator ({str(e).splitlines()[0]}); stopping",
                  file=sys.stderr, flush=True)
            os._exit(1)


def total_steps(cfg: Config) -> int:
    """Global batches to train: the sync trainer's count, so both see the same samples."""
    from distrec.tools.ps.worker import make_worker_loader

    per_epoch = make_worker_loader(cfg, 0, cfg.data.train_split, train=True).num_batches()
    total = per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def coordinate(cfg: Config, procs: dict, init_method: str) -> dict:
    """Create the servers, run the workers, evaluate and checkpoint; returns the final metrics."""
    init_rpc("coordinator", cfg, init_method)
    watchdog = Watchdog(procs, cfg.ps.timeout_s)
    watchdog.start()
    specs = table_specs(cfg, read_manifest(cfg.data.path).get("cardinalities"))
    S = cfg.ps.servers
    servers = [rpc.remote(f"server{s}", ParamServer, args=(cfg, specs, s, S)) for s in range(S)]
    first = restore(cfg, servers)
    client = ServerClient(servers, specs, Partition(cfg.ps.partition, S), cfg.ps.timeout_s)
    total = total_steps(cfg)
    log = MetricsLog(cfg.logging.dir, True, total * cfg.ps.workers, cfg.train.progress_bar, first_step=first)
    write_resolved_config(cfg.logging.dir, dump_toml(cfg))
    log.info(f"async PS: {S} server(s) ({cfg.ps.partition} partition), {cfg.ps.workers} worker(s), "
             f"{total} global batches of {cfg.train.global_batch_size}, workers' dense part in {cfg.train.precision}")
    reporter = Reporter(log, cfg.train.log_every_steps, first_step=first)
    futures = [rpc.rpc_async(f"worker{w}", run_worker, args=(cfg, w, servers, rpc.RRef(reporter), total), timeout=0)
               for w in range(cfg.ps.workers)]
    supervise(cfg, futures, reporter, specs, client, servers, procs)
    if cfg.train.precision == "fp16":  # each worker scales its own loss; an overflowing step pushes nothing
        skipped = [f.wait()["skipped"] for f in futures]
        log.record({"kind": "skip", "skipped": sum(skipped), "per_worker": skipped})
        log.info(f"fp16: {sum(skipped)} worker step(s) overflowed and pushed nothing (per worker: {skipped})")
    reporter.flush()
    totals = reporter.totals()
    result = evaluate(cfg, specs, client)
    log.evaluation(reporter.steps, **result)
    if cfg.checkpoint.dir:
        save(cfg, servers, reporter.steps)
    log.close()
    watchdog.done.set()
    rpc.shutdown()
    return {**result, **totals, "step": reporter.steps}


def supervise(cfg, futures, reporter, specs, client, servers, procs) -> None:
    """While the workers train: evaluate and checkpoint every N worker steps; a worker's error ends the run."""
    next_eval, next_ckpt = cfg.eval.every_steps or 0, cfg.checkpoint.every_steps or 0
    while not all(f.done() for f in futures):
        time.sleep(0.2)
        for w, f in enumerate(futures):
            if f.done():
                try:
                    f.wait()
                except Exception as e:  # noqa: BLE001 - the worker's own error, shown as one line
                    fail_process(f"worker{w}", f"failed: {str(e).strip().splitlines()[-1]}", procs)
        if next_eval and reporter.steps >= next_eval:
            reporter.log.evaluation(reporter.steps, **evaluate(cfg, specs, client))
            next_eval += cfg.eval.every_steps
        if next_ckpt and cfg.checkpoint.dir and reporter.steps >= next_ckpt:
            save(cfg, servers, reporter.steps)
            next_ckpt += cfg.checkpoint.every_steps
    for f in futures:
        f.wait()


def save(cfg: Config, servers: list, step: int) -> None:
    """Every server writes its file into ``dir/step_N``; ``dir/latest`` names it once all are written."""
    folder = Path(cfg.checkpoint.dir) / f"step_{step}"
    for fut in [srv.rpc_async().save(str(folder)) for srv in servers]:
        fut.wait()
    atomic_write(Path(cfg.checkpoint.dir) / "latest", folder.name)


def restore(cfg: Config, servers: list) -> int:
    """With ``checkpoint.resume``, load every server from the newest checkpoint; returns its step."""
    latest = Path(cfg.checkpoint.dir) / "latest" if cfg.checkpoint.dir else None
    if not (cfg.checkpoint.resume and latest and latest.is_file()):
        return 0
    folder = latest.parent / latest.read_text().strip()
    versions = [srv.rpc_sync().load(str(folder)) for srv in servers]
    return versions[0]


def launch_local(cfg: Config) -> dict:
    """Everything on this machine: servers and workers as child processes, the coordinator here."""
    # One machine: the processes meet in a file store, so no rendezvous port is open to the network.
    store = tempfile.mkdtemp(prefix="distrec-ps-")
    init_method = f"file://{store}/store"
    ctx = mp.get_context("spawn")
    logs = Path(cfg.logging.dir) if cfg.logging.dir else Path(store)
    logs.mkdir(parents=True, exist_ok=True)
    procs = {name: ctx.Process(target=serve, args=(name, cfg, init_method, str(logs / f"{name}.stderr")), name=name)
             for name in names(cfg)[1:]}
    for proc in procs.values():
        proc.start()
    print("processes: " + ", ".join(f"{label(n)} pid {p.pid}" for n, p in procs.items()), flush=True)
    try:
        result = coordinate(cfg, procs, init_method)
        shutil.rmtree(store, ignore_errors=True)
    except BaseException as e:  # noqa: BLE001 - never leave children behind
        fail(f"coordinator: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}", procs)
    for proc in procs.values():
        proc.join(cfg.ps.timeout_s)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML file; defaults apply without one")
    p.add_argument("--workers", type=int, help="worker processes (ps.workers)")
    p.add_argument("--servers", type=int, help="server processes (ps.servers)")
    p.add_argument("--role", choices=["all", "coordinator", "server", "worker"], default="all",
                   help="all: every process on this machine; otherwise this one process (several machines)")
    p.add_argument("--index", type=int, default=0, help="which server or worker this process is")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    cfg = load_config(args.config, rest)
    cfg.ps.workers, cfg.ps.servers = args.workers or cfg.ps.workers, args.servers or cfg.ps.servers
    if args.role != "all" and not cfg.ps.master_port:
        raise ConfigError("command line: --role needs --ps.master_port (and --ps.master_addr) on every machine")
    if args.role in ("server", "worker"):
        serve(f"{args.role}{args.index}", cfg, rendezvous(cfg))
        return 0
    result = coordinate(cfg, {name: None for name in names(cfg)[1:]}, rendezvous(cfg)) if args.role == "coordinator" \
        else launch_local(cfg)
    print(f"final: step {result['step']} | auc {result['auc']:.4f} | logloss {result['logloss']:.4f} | "
          f"{result['samples_per_s']:,.0f} samples/s | staleness mean {result['staleness_mean']:.2f} "
          f"p99 {result['staleness_p99']:.0f}", flush=True)
    return 0
