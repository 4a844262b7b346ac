"""The sweep of ``distrec bench``: which runs, as a list of ``RunSpec``.

    specs = sweep(quick=True, repeats=1, models=["demo"], horovod=False)
    specs[0].run_id            # "demo-sync-planner-r1-b2048-0"

A run is one engine training one model with one sharding strategy on ``ranks`` processes for
``steps`` global batches of ``global_batch`` rows: the same sample budget for every engine at a batch
size. Strong scaling keeps the global batch; weak-scaling points (sync, planner) keep the per-rank
batch at half the strong global batch, so at 2 ranks the two coincide and share their run.

The accuracy runs (``purpose="accuracy"``) train the first model well past the start (about an epoch)
with sync on 2 ranks and the async PS on W workers at the same global batch, so that AUC and staleness
can be compared at the same samples; W may exceed the cores (staleness, not speed, decides accuracy).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

ENGINES = ("sync", "horovod", "torchrec", "ps")
STRATEGIES = ("planner", "table_wise", "row_wise", "data_parallel")
PS_STRATEGY = "hash"  # the PS places rows by hash on its servers: no sharding strategy applies

# Overrides on top of each model's config; "heavy" is configs/synthetic_large.toml with its tables cut
# 100-fold (1e7 -> 1e5 rows) so that it fits this machine's memory and time, its MLPs and dim kept.
HEAVY_CARDINALITIES = [100000, 400, 200, 80, 200, 4, 80, 15, 64, 50000, 15000, 3500, 10, 22, 110, 128, 4, 10,
                       14, 100000, 50000, 80000, 4500, 120, 104, 36]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: str  # relative to the repository root
    overrides: tuple[str, ...]
    global_batch: int  # strong scaling
    data_parallel_fits: bool  # every table replicated on every rank fits this machine


MODELS = {
    "demo": ModelSpec("demo", "configs/demo.toml", (), 2048, True),
    "heavy": ModelSpec("heavy", "configs/synthetic_large.toml",
                       (f"--tables.cardinalities={HEAVY_CARDINALITIES}", "--synth.teacher_table_rows=65536",
                        "--synth.row_group_rows=8192"), 1024, True),
}


@dataclass(frozen=True)
class RunSpec:
    model: str
    engine: str  # sync | horovod | torchrec | ps
    strategy: str  # planner | table_wise | row_wise | data_parallel | hash (ps)
    ranks: int
    repeat: int
    global_batch: int
    steps: int  # sample budget = steps * global_batch
    purpose: str = "speed"  # "speed" (the throughput sweep) or "accuracy" (the same samples, well past the start)

    @property
    def key(self) -> str:
        """The configuration, without the repeat: what medians and comparisons group by."""
        key = f"{self.model}-{self.engine}-{self.strategy}-r{self.ranks}-b{self.global_batch}"
        return key if self.purpose == "speed" else f"{key}-s{self.steps}"

    @property
    def run_id(self) -> str:
        return f"{self.key}-{self.repeat}"

    def to_dict(self) -> dict:
        return {**asdict(self), "key": self.key, "run_id": self.run_id}


@dataclass(frozen=True)
class SweepOptions:
    """What ``--quick`` and the full mode differ in (the command line may override each)."""

    models: tuple[str, ...]
    ranks: tuple[int, ...]
    strategies: tuple[str, ...]
    engines: tuple[str, ...]
    repeats: int
    steps: int
    # quick mode: Horovod only at the largest rank count with the planner's plan (its launcher alone
    # takes ~10 s per run on 2 cores)
    horovod_lean: bool = False
    accuracy_workers: tuple[int, ...] = ()  # async PS worker counts of the accuracy runs (none: no such runs)
    accuracy_steps: int = 0  # their global batches: about one epoch of the full sweep's 200,000 rows


ACCURACY_SYNC_RANKS = 2
QUICK = SweepOptions(("demo",), (1, 2), ("planner", "row_wise"), ENGINES, 1, 20, horovod_lean=True)
FULL = SweepOptions(("demo", "heavy"), (1, 2, 4), STRATEGIES, ENGINES, 3, 40, accuracy_workers=(2, 8, 16, 32),
                    accuracy_steps=100)


def configs(opts: SweepOptions) -> list[tuple[str, str, str, int, int]]:
    """(model, engine, strategy, ranks, global batch) of every configuration, repeats left out."""
    out = []
    for name in opts.models:
        model = MODELS[name]
        for ranks in opts.ranks:
            for engine in opts.engines:
                for strategy in _strategies(engine, model, opts, ranks):
                    out.append((name, engine, strategy, ranks, model.global_batch))
            weak = model.global_batch // 2 * ranks
            if "sync" in opts.engines and weak != model.global_batch:
                out.append((name, "sync", "planner", ranks, weak))
    return out


def _strategies(engine: str, model: ModelSpec, opts: SweepOptions, ranks: int) -> list[str]:
    if engine == "ps":
        return [PS_STRATEGY]
    if engine == "horovod" and opts.horovod_lean:
        return ["planner"] if ranks == max(opts.ranks) else []
    return [s for s in opts.strategies if s != "data_parallel" or model.data_parallel_fits]


def accuracy_configs(opts: SweepOptions) -> list[tuple[str, str, str, int, int]]:
    """(model, engine, strategy, ranks, global batch) of the accuracy runs: sync on 2 ranks with the
    planner's plan, and the PS at each worker count, all on the first model's strong global batch."""
    if not opts.accuracy_workers or not opts.accuracy_steps:
        return []
    model = MODELS[opts.models[0]]
    sync = [(model.name, "sync", "planner", ACCURACY_SYNC_RANKS, model.global_batch)] if "sync" in opts.engines else []
    ps = [(model.name, "ps", PS_STRATEGY, w, model.global_batch) for w in opts.accuracy_workers] \
        if "ps" in opts.engines else []
    return sync + ps


def sweep(opts: SweepOptions) -> list[RunSpec]:
    """Every run, repeats interleaved (repeat 0 of everything first) so that load from other jobs on a
    shared machine spreads over configurations instead of hitting one configuration's repeats."""
    def one_repeat(rep: int) -> list[RunSpec]:
        return ([RunSpec(m, e, s, r, rep, b, opts.steps) for m, e, s, r, b in configs(opts)]
                + [RunSpec(m, e, s, r, rep, b, opts.accuracy_steps, "accuracy")
                   for m, e, s, r, b in accuracy_configs(opts)])

    return [spec for rep in range(opts.repeats) for spec in one_repeat(rep)]
