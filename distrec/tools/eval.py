"""``distrec eval``: evaluate a checkpoint on any split, on any world size (resharded on load as a resume).

    distrec eval --checkpoint runs/demo/ckpt --split test                       # one process
    torchrun --standalone --nproc_per_node 3 -m distrec.cli eval --checkpoint runs/demo/ckpt --step 40

Without --config the checkpoint's own resolved config is used (overrides apply on top: --data.path=...).
Prints AUC, logloss and calibration (mean prediction / click rate) and writes {"kind": "eval"} to
metrics.jsonl in --logging.dir when one is given.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from distrec.config import Config, ConfigError, config_from_dict, load_config
from distrec.data.loader import make_loader
from distrec.data.manifest import DataError, read_manifest
from distrec.trainer.build import build_model
from distrec.trainer.checkpoint import CheckpointError, agreed, find_resumable, open_checkpoint
from distrec.trainer.dist import DistContext, all_gather_object, init_distributed, shutdown
from distrec.trainer.evaluate import evaluate
from distrec.trainer.logs import MetricsLog
from distrec.trainer.state import restore
from sharding.types import PlanError


def choose(ckpt_dir: str, step: int | None, ctx: DistContext) -> Path:
    """Rank 0 picks the step (the newest that verifies, or ``step``); every rank gets the same one."""
    chosen, error = None, None
    if ctx.rank == 0:
        path = Path(ckpt_dir) / f"step_{step}" if step is not None else find_resumable(ckpt_dir, warn=print)
        if path is None or not path.is_dir():
            error = f"{ckpt_dir}: " + (f"no step_{step}" if step is not None else "no checkpoint that verifies")
        chosen = str(path) if path else None
    chosen, error = all_gather_object((chosen, error), ctx)[0]
    if error:
        raise CheckpointError(error)
    return Path(chosen)


def eval_config(args: argparse.Namespace, saved: dict, where: str, rest: list[str]) -> Config:
    """--config, else the checkpoint's config; either way the record goes only to a --logging.dir given
    here (not to the training run's folder that the saved config names)."""
    cfg = load_config(args.config, rest) if args.config else config_from_dict(saved, where, rest)
    if not any(a.startswith("--logging.dir") for a in rest):
        cfg.logging.dir = ""
    return cfg


def run_eval(args: argparse.Namespace, rest: list[str], ctx: DistContext) -> dict:
    ckpt = agreed(ctx, open_checkpoint, choose(args.checkpoint, args.step, ctx))
    cfg = eval_config(args, ckpt.common["config"], str(ckpt.path), rest)
    split = args.split or cfg.data.eval_split
    manifest = read_manifest(cfg.data.path)
    built = build_model(cfg, ctx, manifest)
    restore(ckpt, built.model, built.embeddings, built.optimizers, ctx)
    result = evaluate(built.model, make_loader(cfg, manifest, split, ctx, train=False), ctx, calibration=True)
    step = ckpt.common["position"]["step"]
    record = {"kind": "eval", "step": step, "split": split, "checkpoint": str(ckpt.path),
              "world_size": ctx.world_size, **result}
    log = MetricsLog(cfg.logging.dir, ctx.is_main, 0, progress=False, append=True)
    log.record(record)
    log.info(f"eval {ckpt.path} (step {step}) on '{split}', {ctx.world_size} rank(s): auc {result['auc']:.6f} | "
             f"logloss {result['logloss']:.6f} | calibration {result['calibration']:.4f} (mean prediction "
             f"{result['mean_prediction']:.4f} / click rate {result['click_rate']:.4f}) | {result['rows']:,} rows")
    return record


def main(args: argparse.Namespace, rest: list[str]) -> int:
    if not Path(args.checkpoint).is_dir():
        raise ConfigError(f"--checkpoint {args.checkpoint}: not a folder")
    ctx = init_distributed(_device(rest, "auto"), "ddp")
    try:
        run_eval(args, rest, ctx)
        return 0
    except (ConfigError, CheckpointError, DataError, PlanError) as e:  # on every rank, with its rank: none is left waiting
        raise type(e)(f"[rank {ctx.rank}] {e}" if ctx.world_size > 1 else str(e)) from None
    finally:
        shutdown(ctx)


def _device(rest: list[str], default: str) -> str:
    """--train.device=... from the overrides (the config is read only once the checkpoint is chosen)."""
    given = [a.split("=", 1)[1] for a in rest if a.startswith("--train.device=")]
    return given[-1] if given else default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (its newest step that verifies)")
    p.add_argument("--step", type=int, help="evaluate step_<N> instead of the newest")
    p.add_argument("--config", help="a TOML config; default: the config saved in the checkpoint")
    p.add_argument("--split", help="a split of the data's manifest; default: data.eval_split")
