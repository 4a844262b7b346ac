"""``distrec reshard``: re-cut a checkpoint's embedding shards offline for another plan or world size,
or export it unsharded (every table whole) for single-process inference.

    distrec reshard --checkpoint runs/demo/ckpt --out runs/demo/ckpt4 --world-size 4 --plan.default=table_wise
    distrec reshard --checkpoint runs/demo/ckpt --out model.pt --unsharded

Training also reshards on load (any plan, any world size), so this is for moving checkpoints around
ahead of time and for inference outside distrec's trainer.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from distrec.config import Config, ConfigError, load_config
from distrec.trainer.checkpoint import load_latest, save_checkpoint
from sharding.checkpoint import recut, table_sizes, whole_tables
from sharding.plan import load_plan
from sharding.planner import simple_plan
from sharding.types import TableConfig


def _tables(state: dict) -> list[TableConfig]:
    pooling = state["config"]["tables"]["pooling"]
    return [TableConfig(name, rows, dim, pooling) for name, (rows, dim) in table_sizes(state["shards"]).items()]


def unsharded(state: dict) -> dict:
    """{"dense": the DLRM's non-embedding state, "tables": {name: full weight}}."""
    whole = whole_tables(state["shards"], state["config"]["optimizer"]["sparse"])
    return {"dense": state["dense"], "tables": {p["table"]: p["weight"] for p in whole},
            "step": state["position"]["step"]}


def offline_default(cfg: Config) -> str:
    """plan.default, where "auto" (the planner, which plans for the training job's device when it starts
    and reshards on load anyway) is the built-in row-wise cut here."""
    return "row_wise" if cfg.plan.default == "auto" else cfg.plan.default


def resharded(state: dict, cfg: Config, world_size: int) -> tuple[dict, list[dict]]:
    """(common part, one rank file's content per new rank): the shards cut for the new plan, each on the
    rank that will hold it; a data-parallel table goes to every rank."""
    tables = _tables(state)
    plan = load_plan(cfg.plan.file, tables, world_size) if cfg.plan.file else \
        simple_plan(tables, world_size, offline_default(cfg), cfg.plan.overrides())
    kind = state["config"]["optimizer"]["sparse"]
    owns = []
    for rank in range(world_size):
        targets = [(t.name, s) for t in tables for s in plan.tables[t.name].shards if s.rank == rank]
        rng = state["rng"][rank] if rank < len(state["rng"]) else None
        owns.append({"shards": recut(state["shards"], targets, kind), "rng": rng})
    common = {k: v for k, v in state.items() if k not in ("shards", "rng")}
    return {**common, "world_size": world_size}, owns


def check_target(args: argparse.Namespace, tables: list[TableConfig]) -> None:
    """Refuse what would destroy the source or make an absurd checkpoint."""
    src, out = Path(args.checkpoint).resolve(), Path(args.out).resolve()
    if out == src or src in out.parents:
        raise ConfigError(f"reshard: --out {args.out} is the checkpoint being read (or inside it); "
                          "write the resharded checkpoint to another folder")
    largest = max(t.num_rows for t in tables)
    if not args.unsharded and args.world_size > largest:
        raise ConfigError(f"reshard: --world-size {args.world_size} is more ranks than the largest table has rows "
                          f"({largest}): most ranks would hold nothing")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    state = load_latest(args.checkpoint)
    if state is None:
        raise FileNotFoundError(f"{args.checkpoint}: no checkpoint (step_*/) found")
    check_target(args, _tables(state))
    if args.unsharded:
        torch.save(unsharded(state), args.out)
        print(f"wrote {args.out}: step {state['position']['step']}, every table whole")
        return 0
    cfg = load_config(None, rest)
    common, owns = resharded(state, cfg, args.world_size)
    save_checkpoint(Path(args.out), state["position"]["step"], common, owns, keep=1)
    print(f"wrote {args.out}: step {state['position']['step']}, {sum(len(o['shards']) for o in owns)} shards "
          f"for {args.world_size} ranks ({f'plan {cfg.plan.file}' if cfg.plan.file else offline_default(cfg)})")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (its newest step is used)")
    p.add_argument("--out", required=True, help="a checkpoint folder, or a .pt file with --unsharded")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--unsharded", action="store_true", help="every table whole, for single-process inference")
