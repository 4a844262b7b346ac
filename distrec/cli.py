"""The ``distrec`` command.

    distrec --version
    distrec doctor
    distrec data synth --config configs/demo.toml --out runs/demo/data
    distrec data preprocess --in day_0.gz day_1.gz --out runs/criteo
    distrec reshard --checkpoint runs/demo/ckpt --out model.pt --unsharded
    distrec ps --workers 2 --servers 1 --config configs/demo.toml
    distrec plan --gpus 8 --config configs/criteo_terabyte.toml --hbm-gb 16 --json plan.json
    distrec bench --quick --out report/
    distrec eval --checkpoint runs/demo/ckpt --split test
    distrec export --checkpoint runs/demo/ckpt --out runs/demo/serve --format both
"""
from __future__ import annotations

import argparse
import os
import sys

from distrec import __version__, print_error
from distrec.config import ConfigError
from distrec.data.manifest import DataError
from sharding.types import PlanError

CPP_LOG_LEVEL = "TORCH_CPP_LOG_LEVEL"


def _synth(args: argparse.Namespace, rest: list[str]) -> int:
    from distrec.config import load_config
    from distrec.tools.data.synth import synthesize

    cfg = load_config(args.config, rest)
    manifest = synthesize(cfg, args.out)
    print(f"wrote {args.out}: {manifest['splits']['train']['rows']} train rows, "
          f"{manifest['splits']['valid']['rows']} valid rows, click rate {manifest['click_rate']:.3f}, "
          f"Bayes AUC {manifest['bayes_auc']:.4f}")
    return 0


def _preprocess(args: argparse.Namespace, rest: list[str]) -> int:
    from distrec.tools.data.preprocess import main as preprocess_main

    return preprocess_main(args, rest)


def _libfm(args: argparse.Namespace, rest: list[str]) -> int:
    from distrec.tools.data.libfm import main as libfm_main

    return libfm_main(args)


def _doctor(args: argparse.Namespace, rest: list[str]) -> int:
    from distrec.tools.doctor import main as doctor_main

    return doctor_main()


def _reshard(args: argparse.Namespace, rest: list[str]) -> int:
    from distrec.tools.reshard import main as reshard_main

    return reshard_main(args, rest)


def _ps(args: argparse.Namespace, rest: list[str]) -> int:
    from distrec.tools.ps.launch import main as ps_main

    return ps_main(args, rest)


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    from distrec.tools.bench.cli import main as bench_main

    try:
        return bench_main(args, rest)
    except (ValueError, RuntimeError) as e:  # bad options, a failed data synthesis
        print_error(f"distrec: error: {e}")
        return 2


def _eval(args: argparse.Namespace, rest: list[str]) -> int:
    from distrec.tools.eval import main as eval_main

    return eval_main(args, rest)


def _export(args: argparse.Namespace, rest: list[str]) -> int:
    from distrec.tools.export import main as export_main

    return export_main(args, rest)


def _plan(args: argparse.Namespace, rest: list[str]) -> int:
    from distrec.tools.plan import main as plan_main

    return plan_main(args, rest)


OVERRIDES = "Further arguments are config overrides: --section.key=value"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distrec", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"distrec {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="versions, compatibility, backends, GPUs").set_defaults(func=_doctor)
    data = sub.add_parser("data", help="make data sets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="synthetic Criteo-shaped data from a hidden teacher model", epilog=OVERRIDES)
    synth.add_argument("--config", required=True)
    synth.add_argument("--out", required=True)
    synth.set_defaults(func=_synth)
    from distrec.tools.data.preprocess import add_arguments as add_preprocess_arguments

    _command(data, "preprocess", "Criteo TSV (plain or gzip) -> Parquet shards + manifest", add_preprocess_arguments,
             _preprocess, epilog=None)
    from distrec.tools.data.libfm import add_arguments as add_libfm_arguments

    _command(data, "libfm", "libFM files (public CTR benchmarks) -> TSV for `data preprocess`", add_libfm_arguments,
             _libfm, epilog=None)
    from distrec.tools.reshard import add_arguments as add_reshard_arguments

    _command(sub, "reshard", "re-cut a checkpoint for another plan / world size, or unshard it", add_reshard_arguments,
             _reshard, epilog="Further arguments are config overrides for the target plan: --plan.default=...")
    from distrec.tools.ps.launch import add_arguments as add_ps_arguments

    _command(sub, "ps", "asynchronous parameter-server training on CPU (torch.distributed.rpc)", add_ps_arguments, _ps)
    from distrec.tools.plan import add_arguments as add_plan_arguments

    _command(sub, "plan", "place the embedding tables on N ranks: estimated memory, step time, why", add_plan_arguments,
             _plan)
    from distrec.tools.eval import add_arguments as add_eval_arguments

    _command(sub, "eval", "evaluate a checkpoint on a split (AUC, logloss, calibration), on any world size",
             add_eval_arguments, _eval)
    from distrec.tools.export import add_arguments as add_export_arguments

    _command(sub, "export", "a checkpoint as a Triton model repository (TorchScript and/or ONNX, config.pbtxt)",
             add_export_arguments, _export, epilog=None)
    from distrec.tools.bench.cli import add_arguments as add_bench_arguments

    _command(sub, "bench", "scaling benchmark report: sweep engines, strategies and ranks; `bench compare A B`",
             add_bench_arguments, _bench, epilog=None)
    return p


def _command(sub, name: str, help: str, add_arguments, func, epilog: str | None = OVERRIDES) -> None:
    """A subcommand whose options its own module adds (its module is imported only to add them)."""
    parser = sub.add_parser(name, help=help, epilog=epilog)
    add_arguments(parser)
    parser.set_defaults(func=func)


def _quiet_rpc_warnings(argv: list[str]) -> None:
    """`distrec ps` says a process's death in one line, last; without this the coordinator's torch RPC
    first logs a C++ warning about the broken connection. c10 reads TORCH_CPP_LOG_LEVEL once, when torch
    is first imported (so this module imports torch only after it): set it for that import only, so
    that the children spawned later, whose stderr goes to LOGDIR/<name>.stderr, still log theirs there."""
    if argv[:1] != ["ps"] or "torch" in sys.modules or CPP_LOG_LEVEL in os.environ:
        return
    os.environ[CPP_LOG_LEVEL] = "ERROR"
    try:
        import torch  # noqa: F401 - its C++ logging is set up here, at that level
    finally:
        del os.environ[CPP_LOG_LEVEL]


def main(argv: list[str] | None = None) -> int:
    _quiet_rpc_warnings(sys.argv[1:] if argv is None else argv)
    from distrec.trainer.checkpoint import CheckpointError  # imports torch

    args, rest = build_parser().parse_known_args(argv)
    try:
        return args.func(args, rest)
    except (ConfigError, DataError, PlanError, FileNotFoundError, CheckpointError) as e:
        print_error(f"distrec: error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
