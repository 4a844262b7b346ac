"""TOML configs mapped onto dataclasses, overridable on the command line as ``--section.key=value``.

    cfg = load_config("configs/demo.toml", ["--train.global_batch_size=8192"])
    cfg.train.global_batch_size  # 8192

Unknown sections or keys and values of the wrong type raise :class:`ConfigError` naming the key and
where it came from (the file, or the command line).
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The sparse operation kit's vocabularies: configs are checked against the names the kit defines.
from sharding.planner.topology import PRESETS
from sharding.types import KERNELS, OPTIMIZERS, PRECISIONS, SHARDING_TYPES, TABLE_INITS


CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]
DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam")  # distrec.trainer.optim.dense_optimizer


class ConfigError(ValueError):
    """A config problem, with the file (or command line) and key in the message."""


@dataclass
class DataConfig:
    path: str = "runs/demo/data"  # a folder with manifest.json (from `distrec data synth|preprocess`)
    train_split: str = "train"
    eval_split: str = "valid"
    test_split: str = ""  # "": none; else evaluated once at the end, with the best model (or the last)
    shuffle: bool = True  # row-group order and rows within a group, per seed and epoch
    drop_last: bool = False  # False: the last partial global batch is trained on, split over ranks
    prefetch_batches: int = 4  # batches each rank decodes ahead in its background thread


@dataclass
class SchemaConfig:
    preset: str = "criteo"  # "criteo": 13 dense I1..I13 + 26 categorical C1..C26; "none": name them
    label: str = "label"
    dense: list[str] | None = None  # None: from the preset; [] means no dense features (no bottom MLP)
    categorical: list[str] | None = None


@dataclass
class TablesConfig:
    """One embedding table per categorical feature; scalar defaults, optional per-table lists."""

    dim: int = 16
    dims: list[int] = field(default_factory=list)
    cardinality: int = 1000  # rows per table
    cardinalities: list[int] = field(default_factory=list)
    pooling: str = "sum"  # sum | mean
    zipf_exponent: float = 1.1  # id popularity for `data synth`
    zipf_exponents: list[float] = field(default_factory=list)
    hotness: int = 1  # ids per sample per feature for `data synth` (1: one-hot)
    hotnesses: list[int] = field(default_factory=list)
    # Initial rows (sharding.init, the same whatever the plan): uniform (DLRM's +-sqrt(1 / rows)) |
    # normal (mean 0, std init_std) | zeros; per table with inits / init_stds
    init: str = "uniform"
    inits: list[str] = field(default_factory=list)
    init_std: float = 0.01
    init_stds: list[float] = field(default_factory=list)
    # How the weights are stored: fp32 | fp16 | bf16 (half the memory; optimizer state stays fp32 and
    # updates are computed in fp32, then rounded: stochastically unless stochastic_rounding = false,
    # see sharding.rounding); per table with precisions
    precision: str = "fp32"
    precisions: list[str] = field(default_factory=list)
    stochastic_rounding: bool = True


@dataclass
class ModelConfig:
    bottom_mlp: list[int] = field(default_factory=lambda: [64, 16])  # last size = embedding dim (dot)
    top_mlp: list[int] = field(default_factory=lambda: [64, 32])  # a final 1-unit layer is added
    # dot: pairwise dot products | cat: the dense vector and every pooled embedding side by side |
    # dcn: DCN-v2 cross layers over that concatenation ("dcn" with dcn_layers = 0 is "cat")
    interaction: str = "dot"
    dcn_layers: int = 2
    dcn_low_rank: int = 0  # 0: full-rank DCN-v2 cross layers
    # Each hidden layer of the MLPs is Linear -> norm -> ReLU -> dropout; the top MLP's final 1-unit
    # layer has neither. dropout: one rate for every hidden layer, or a list of rates, one per hidden
    # layer, the bottom MLP's first (len(bottom_mlp), none without dense features), then the top MLP's
    # (len(top_mlp)). Off in eval().
    dropout: float | list[float] = 0.0
    # none | batch (BatchNorm1d; statistics of each rank's local batch) | layer (LayerNorm)
    norm: str = "none"
    # DeepFM's factorization machine added to the logit, over the pooled embedding vectors v_f:
    # w . concat(v_f) + 0.5 * sum_d((sum_f v_f)^2 - sum_f v_f^2); needs one embedding dim
    fm: bool = False
    # Every Linear weight of the dense part (MLPs, cross layers, the FM's first-order weights): default
    # (torch's, unchanged) | xavier_uniform | xavier_normal (the xavier ones zero the biases)
    init: str = "default"


@dataclass
class PlanConfig:
    """Where each table lives: a plan file, the cost-model planner's plan, or a built-in placement, with
    per-table overrides."""

    # auto: the cost-model planner plans for this job's ranks and device when training starts (the plan
    # `distrec plan --json` writes for the same inputs; the lists below fix those tables' types) |
    # table_wise | row_wise | column_wise | data_parallel | table_row_wise: the built-in placement
    default: str = "auto"
    file: str = ""  # a plan JSON (sharding.plan.save_plan); overrides everything below
    table_wise: list[str] = field(default_factory=list)  # tables placed otherwise than the default
    row_wise: list[str] = field(default_factory=list)
    column_wise: list[str] = field(default_factory=list)
    data_parallel: list[str] = field(default_factory=list)
    table_row_wise: list[str] = field(default_factory=list)
    # Lookup kernel for the sharded tables: auto (fbgemm's table-batched op with its fused optimizer where
    # it can run the plan; on CUDA without it, triton; else torch) | torch (F.embedding_bag +
    # SparseOptimizer) | fbgemm | triton
    kernel: str = "auto"
    # The pooled-embedding all-to-all in fp32 | fp16 | bf16 (TorchRec's quantized comms): the forward's
    # pooled vectors, and with comm_precision_backward (same: as the forward) their gradients; the
    # row-wise partial sums are added in fp32 after the exchange (the two-level exchange sends fp32 only).
    # dense_comm_precision = "bf16" all-reduces the dense gradients as bf16 (DDP; summed in bf16 by the
    # backend, then written back to the fp32 gradients).
    comm_precision: str = "fp32"
    comm_precision_backward: str = "same"
    dense_comm_precision: str = "fp32"

    def overrides(self) -> dict[str, str]:
        return {name: kind for kind in SHARDING_TYPES for name in getattr(self, kind)}


@dataclass
class PlannerConfig:
    """``distrec plan`` and the trainer's estimates: the device (a preset, any number overridden), the
    work beside the tables, per-table constraints. GB are 1e9 bytes; 0 means "the preset's"."""

    preset: str = "h100-80g"  # a100-80g | h100-80g | h200 | cpu; the trainer uses cpu on CPU ranks
    nodes: int = 1
    hbm_gb: float = 0.0  # device memory per rank
    mem_bw_gbps: float = 0.0  # device memory bandwidth per rank, GB/s
    intra_node_gbps: float = 0.0  # per rank, one direction, GB/s
    inter_node_gbps: float = 0.0
    batch_size: int = 0  # per rank; 0: train.global_batch_size / ranks
    reserve_gb: float = 1.0  # per rank, for the dense model, its optimizer and activations
    pooling_factors: list[float] = field(default_factory=list)  # ids per sample per feature; []: hotnesses
    allowed_types: dict[str, list[str]] = field(default_factory=dict)  # table -> types it may take
    pinned_ranks: dict[str, list[int]] = field(default_factory=dict)  # table -> ranks it may use
    data_parallel_max_mb: float = 64.0  # tables up to this many MB of weights may be replicated
    calibration: str = ""  # rates from `distrec plan --calibrate`; "": the default file if any; "none"


@dataclass
class OptimizerConfig:
    dense: str = "adam"  # sgd | adagrad | adam, for the MLPs
    dense_lr: float = 1e-3
    sparse: str = "adagrad"  # sgd | adagrad | rowwise_adagrad | adam (lazy): fused, on the rows' owner
    sparse_lr: float = 0.05
    eps: float = 1e-8
    # Regularization (README "Regularization"): weight decay of the dense MLPs, decoupled for adam (torch
    # AdamW), L2 added to the gradient for sgd and adagrad; 0 keeps plain Adam
    dense_weight_decay: float = 0.0
    # L2 on the embedding rows a batch touches: g_row += sparse_l2 * w_row once per step for every row with
    # at least one id in the global batch, before the sparse optimizer's rule (sharding.optim)
    sparse_l2: float = 0.0
    # Learning-rate schedule of dense_lr and sparse_lr (README "Schedules", distrec.trainer.schedule):
    # constant | warmup | step | exponential | plateau | mlperf
    schedule: str = "constant"
    schedule_sparse: bool = True  # false: sparse_lr stays constant, only dense_lr follows the schedule
    warmup_steps: int = 0  # warmup, mlperf: lr rises linearly over this many steps
    decay_steps: int = 0  # step: decay every this many steps; exponential: rate's unit; mlperf: decay length
    decay_rate: float = 0.1  # step, exponential, plateau: the multiplier
    decay_start_step: int = 0  # mlperf: where the polynomial decay begins
    plateau_metric: str = "auc"  # plateau: auc (higher is better) | logloss (lower is better)
    plateau_patience: int = 2  # plateau: evaluations without improvement before the lr is reduced


@dataclass
class DenseConfig:
    """Who synchronises the dense part (and carries the embedding exchanges) across ranks."""

    # ddp: torch DDP + torch.distributed all-to-all, under torchrun | horovod: hvd.DistributedOptimizer +
    # hvd.alltoall, under horovodrun (launch/install_horovod.sh installs it)
    engine: str = "ddp"


@dataclass
class EarlyStopConfig:
    """Stop when ``metric`` has not improved for ``patience`` evaluations in a row (at eval.every_steps)."""

    metric: str = ""  # "": off | auc (higher is better) | logloss (lower is better)
    patience: int = 2


@dataclass
class TrainConfig:
    seed: int = 0
    global_batch_size: int = 4096  # summed over ranks
    epochs: int = 1
    max_steps: int = 0  # 0: no limit
    device: str = "auto"  # auto | cpu | cuda
    # start batch i+1's id all-to-all while batch i's dense part runs; off on one rank whatever this says.
    # Off by default: on 2 shared CPU cores (gloo) it measured slower or level (docs/benchmarks.md)
    pipeline: bool = False
    # run the bottom MLP while the pooled embeddings are exchanged, and its backward while their gradients
    # are (results are the same either way; false: one after the other, to measure what the overlap buys)
    overlap: bool = True
    log_every_steps: int = 50
    progress_bar: bool = True
    # >0: time each step's phases (data wait, all-to-alls, lookup, all-reduce, optimizer) and write their
    # means over the last N steps as {"kind": "breakdown"} to metrics.jsonl (distrec bench uses it)
    profile_steps: int = 0
    # the dense part's compute: "bf16" | "fp16" run the bottom MLP, the interaction and the top MLP under
    # that autocast (dense weights, optimizer state and the loss stay fp32; tables.precision and
    # plan.comm_precision set the embeddings'); bf16 gives 3.6x faster MLPs on CPUs with AMX. fp16 scales
    # the loss dynamically (distrec.trainer.loss_scale): a step whose gradients overflow on any rank updates
    # nothing, dense or sparse, and is logged ({"kind": "skip"} in metrics.jsonl)
    precision: str = "fp32"
    loss_scale: float = 65536.0  # fp16: the first step's loss scale (torch.amp.GradScaler's init_scale)
    # train.early_stop = {metric = "auc", patience = 2}, or --train.early_stop.patience=3
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: evaluate at the end only
    batch_size: int = 16384  # global
    max_rows: int = 0  # 0: the whole eval split
    precision: str = "train"  # train: the dense part as train.precision computes it | fp32


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" disables checkpoints
    every_steps: int = 0  # 0: only at the end
    resume: bool = False  # continue from the newest checkpoint in dir
    keep: int = 2
    # "auc" | "logloss": a checkpoint at every evaluation, the best by this metric kept apart from `keep`
    # (DIR/best.json names it) and evaluated at the end; "": off
    keep_best: str = ""


@dataclass
class PsConfig:
    """`distrec ps`: asynchronous parameter-server training (CPU, torch.distributed.rpc)."""

    workers: int = 2
    servers: int = 1
    partition: str = "hash"  # hash: row r of a table lives on server r % servers | range: contiguous blocks
    timeout_s: float = 60.0  # RPC timeout, and how long a dead or silent process may go unnoticed
    master_addr: str = "127.0.0.1"  # the coordinator's address: every process connects to it
    master_port: int = 0  # 0: a free port (one machine only)
    threads_per_process: int = 1  # torch intra-op threads in each server and worker


@dataclass
class LoggingConfig:
    dir: str = ""  # metrics.jsonl and config.toml are written here


@dataclass
class SynthConfig:
    seed: int = 1234
    train_rows: int = 1_000_000
    eval_rows: int = 100_000
    rows_per_file: int = 500_000
    row_group_rows: int = 8192  # small groups let each rank read little more than its own rows
    target_auc: float = 0.80  # Bayes AUC the teacher is calibrated to
    target_ctr: float = 0.12  # click rate the teacher is calibrated to
    teacher_dim: int = 2  # low rank per table: a dot-interaction DLRM can represent the teacher
    teacher_hidden: int = 32
    teacher_table_rows: int = 1 << 20  # teacher embeddings are hashed into this many rows


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    schema: SchemaConfig = field(default_factory=SchemaConfig)
    tables: TablesConfig = field(default_factory=TablesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ps: PsConfig = field(default_factory=PsConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    source: str = "<defaults>"  # where the config came from, for messages


@dataclass(frozen=True)
class TableSpec:
    """One embedding table, resolved from [schema] and [tables]."""

    name: str  # the categorical feature it serves
    num_rows: int
    dim: int
    pooling: str
    zipf_exponent: float
    hotness: int
    init: str = "uniform"  # sharding.types.TABLE_INITS
    init_std: float = 0.0
    precision: str = "fp32"  # sharding.types.PRECISIONS: the weights' storage


SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "source"]
CHOICES = {
    ("schema", "preset"): ("criteo", "none"),
    ("tables", "pooling"): ("sum", "mean"),
    ("model", "interaction"): ("dot", "cat", "dcn"),
    ("model", "norm"): ("none", "batch", "layer"),
    ("model", "init"): ("default", "xavier_uniform", "xavier_normal"),
    ("tables", "init"): TABLE_INITS,
    ("tables", "precision"): PRECISIONS,
    ("plan", "comm_precision"): PRECISIONS,
    ("plan", "comm_precision_backward"): ("same", *PRECISIONS),
    ("plan", "dense_comm_precision"): ("fp32", "bf16"),
    ("optimizer", "dense"): DENSE_OPTIMIZERS,
    ("optimizer", "sparse"): OPTIMIZERS,
    ("optimizer", "schedule"): ("constant", "warmup", "step", "exponential", "plateau", "mlperf"),
    ("optimizer", "plateau_metric"): ("auc", "logloss"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("eval", "precision"): ("train", "fp32"),
    ("train", "early_stop.metric"): ("", "auc", "logloss"),
    ("checkpoint", "keep_best"): ("", "auc", "logloss"),
    ("plan", "default"): ("auto", *SHARDING_TYPES),
    ("plan", "kernel"): KERNELS,
    ("dense", "engine"): ("ddp", "horovod"),
    ("ps", "partition"): ("hash", "range"),
    ("planner", "preset"): tuple(PRESETS),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if not typing.get_args(tp) else str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:  # the first type the value fits (float | list[float]: 0.1, [0.1])
            try:
                return _coerce(value, alternative, where)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table {{name = value}}, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(args[0])}, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    """Set ``section.key``; ``key`` may name a nested table's key (``early_stop.patience``), and a TOML
    table given for a nested table sets its keys one by one (each checked)."""
    if section not in SECTIONS:
        hint = difflib.get_close_matches(section, SECTIONS, n=1)
        raise ConfigError(f"{where}: unknown section [{section}]"
                          + (f" (did you mean [{hint[0]}]?)" if hint else f" (known: {', '.join(SECTIONS)})"))
    sect, *parents = [getattr(cfg, section), *key.split(".")[:-1]]
    leaf, path = key.split(".")[-1], section
    for part in parents:
        sect, path = _nested(sect, path, part, where), f"{path}.{part}"
    hints = typing.get_type_hints(type(sect))
    if leaf not in hints:
        close = difflib.get_close_matches(leaf, list(hints), n=1)
        raise ConfigError(f"{where}: unknown key '{path}.{leaf}'"
                          + (f" (did you mean '{path}.{close[0]}'?)" if close else ""))
    if dataclasses.is_dataclass(hints[leaf]):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {path}.{leaf}: expected a table {{key = value}}, got {value!r}")
        for k, v in value.items():
            _apply(cfg, section, f"{key}.{k}", v, where)
        return
    value = _coerce(value, hints[leaf], f"{where}: {path}.{leaf}")
    allowed = CHOICES.get((section, key))
    if allowed and value not in allowed:
        names = ", ".join(a if a else '"" (off)' for a in allowed)
        raise ConfigError(f"{where}: {section}.{key} = {value!r} is not one of {names}")
    setattr(sect, leaf, value)


def _nested(sect: Any, path: str, part: str, where: str) -> Any:
    """The nested table ``path.part`` (an error when there is none by that name)."""
    hints = typing.get_type_hints(type(sect))
    if part not in hints or not dataclasses.is_dataclass(hints[part]):
        raise ConfigError(f"{where}: unknown key '{path}.{part}' (not a table)" if part not in hints else
                          f"{where}: '{path}.{part}' is a value, not a table")
    return getattr(sect, part)


def _parse_value(text: str) -> Any:
    """A command-line value is read as a TOML value (``8``, ``true``, ``[64, 16]``), else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> list[tuple[str, str, Any]]:
    """``["--train.seed=3", "--model.top_mlp", "[8]"]`` -> ``[("train", "seed", 3), ("model", ...)]``."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"command line: expected --section.key=value, got {arg!r}")
        name, sep, text = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: --{name} needs a value")
            text, i = args[i + 1], i + 1
        section, _, key = name.partition(".")
        out.append((section, key, _parse_value(text)))
        i += 1
    return out


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    doc = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            doc = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return config_from_dict(doc, path or "", overrides)


def config_from_dict(doc: dict, where: str, overrides: list[str] | None = None) -> Config:
    """A Config from a parsed TOML document or a checkpoint's saved ``to_dict`` (``where`` names it in
    errors), then the command-line overrides.

        cfg = config_from_dict(ckpt.common["config"], "runs/ckpt/step_40", ["--data.path=runs/demo/data"])
    """
    cfg = Config()
    for section, body in doc.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: top-level key '{section}' must be a [section]")
        for key, value in body.items():
            _apply(cfg, section, key, value, where)
    if where:
        cfg.source = where
    for section, key, value in parse_overrides(overrides or []):
        _apply(cfg, section, key, value, f"command line --{section}.{key}")
    _resolve_schema(cfg.schema)
    validate(cfg)
    return cfg


def _resolve_schema(schema: SchemaConfig) -> None:
    preset = schema.preset == "criteo"
    if schema.dense is None:
        schema.dense = list(CRITEO_DENSE) if preset else []
    if schema.categorical is None:
        schema.categorical = list(CRITEO_CATEGORICAL) if preset else []


def _per_table(cfg: Config, name: str, scalar: Any, values: list) -> list:
    n = len(cfg.schema.categorical)
    if not values:
        return [scalar] * n
    if len(values) != n:
        raise ConfigError(f"{cfg.source}: tables.{name} has {len(values)} entries but the schema has "
                          f"{n} categorical features")
    return list(values)


def table_specs(cfg: Config, cardinalities: dict[str, int] | None = None) -> list[TableSpec]:
    """The tables, one per categorical feature; ``cardinalities`` (from a data manifest) fill in rows
    where the config gives none."""
    t = cfg.tables
    rows = _per_table(cfg, "cardinalities", t.cardinality, t.cardinalities)
    if cardinalities and not t.cardinalities:
        rows = [cardinalities[n] for n in cfg.schema.categorical]
    dims = _per_table(cfg, "dims", t.dim, t.dims)
    zipf = _per_table(cfg, "zipf_exponents", t.zipf_exponent, t.zipf_exponents)
    hot = _per_table(cfg, "hotnesses", t.hotness, t.hotnesses)
    inits = _per_table(cfg, "inits", t.init, t.inits)
    stds = _per_table(cfg, "init_stds", t.init_std, t.init_stds)
    precisions = _per_table(cfg, "precisions", t.precision, t.precisions)
    return [TableSpec(n, r, d, t.pooling, z, h, i, sd, p)
            for n, r, d, z, h, i, sd, p in zip(cfg.schema.categorical, rows, dims, zipf, hot, inits, stds, precisions)]


def validate(cfg: Config) -> None:
    src, s = cfg.source, cfg.schema
    names = [s.label, *s.dense, *s.categorical]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{src}: schema column names repeat: {', '.join(dup)}")
    if not s.categorical:
        raise ConfigError(f"{src}: schema.categorical is empty; a DLRM needs at least one table")
    specs = table_specs(cfg)
    for spec in specs:
        if spec.num_rows < 1 or spec.dim < 1 or spec.hotness < 1:
            raise ConfigError(f"{src}: table {spec.name}: rows, dim and hotness must be >= 1, got "
                              f"{spec.num_rows}, {spec.dim}, {spec.hotness}")
    _validate_inits(cfg, specs)
    m = cfg.model
    _validate_model(cfg, specs)
    if m.interaction == "dot":
        dims = {spec.dim for spec in specs}
        if len(dims) > 1:
            raise ConfigError(f"{src}: model.interaction = 'dot' needs one embedding dim for all tables, "
                              f"got {sorted(dims)}; use 'dcn' or equal tables.dims")
        if s.dense and (not m.bottom_mlp or m.bottom_mlp[-1] != specs[0].dim):
            raise ConfigError(f"{src}: model.bottom_mlp must end in the embedding dim {specs[0].dim} "
                              f"for the dot interaction, got {m.bottom_mlp}")
    if cfg.train.global_batch_size < 1:
        raise ConfigError(f"{src}: train.global_batch_size must be >= 1")
    if cfg.ps.workers < 1 or cfg.ps.servers < 1 or cfg.ps.timeout_s <= 0:
        raise ConfigError(f"{src}: ps.workers and ps.servers must be >= 1 and ps.timeout_s > 0")
    _validate_planner(cfg, [spec.name for spec in specs])
    _validate_best(cfg)
    _validate_optimizer(cfg)
    _validate_precision(cfg)


def _validate_precision(cfg: Config) -> None:
    if cfg.plan.dense_comm_precision != "fp32" and cfg.dense.engine == "horovod":
        raise ConfigError(f"{cfg.source}: plan.dense_comm_precision = {cfg.plan.dense_comm_precision!r} needs "
                          "dense.engine = \"ddp\" (Horovod compresses gradients to fp16 only)")
    if not cfg.train.loss_scale > 0:
        raise ConfigError(f"{cfg.source}: train.loss_scale must be > 0, got {cfg.train.loss_scale}")
    if cfg.train.precision == "fp16" and cfg.dense.engine == "horovod":
        raise ConfigError(f"{cfg.source}: train.precision = \"fp16\" needs dense.engine = \"ddp\": its overflow check "
                          "reads the summed dense gradients before the step, and Horovod sums them inside its step")


def _validate_best(cfg: Config) -> None:
    """Early stopping needs periodic evaluations; the best model is kept on disk, in checkpoint.dir."""
    src, stop = cfg.source, cfg.train.early_stop
    if stop.metric and (stop.patience < 1 or cfg.eval.every_steps < 1):
        raise ConfigError(f"{src}: train.early_stop needs train.early_stop.patience >= 1 and eval.every_steps >= 1 "
                          f"(got {stop.patience} and {cfg.eval.every_steps})")
    if (stop.metric or cfg.checkpoint.keep_best) and not cfg.checkpoint.dir:
        raise ConfigError(f"{src}: train.early_stop and checkpoint.keep_best keep the best model in checkpoint.dir, "
                          "which is not set")
    if stop.metric and cfg.checkpoint.keep_best and stop.metric != cfg.checkpoint.keep_best:
        raise ConfigError(f"{src}: train.early_stop.metric = {stop.metric!r} and checkpoint.keep_best = "
                          f"{cfg.checkpoint.keep_best!r}: one best model, one metric; make them the same")


def _validate_inits(cfg: Config, specs: list[TableSpec]) -> None:
    bad_precision = [p for p in cfg.tables.precisions if p not in PRECISIONS]
    if bad_precision:
        raise ConfigError(f"{cfg.source}: tables.precisions has {bad_precision[0]!r}, which is not one of "
                          f"{', '.join(PRECISIONS)}")
    bad = [i for i in cfg.tables.inits if i not in TABLE_INITS]
    if bad:
        raise ConfigError(f"{cfg.source}: tables.inits has {bad[0]!r}, which is not one of {', '.join(TABLE_INITS)}")
    for spec in specs:
        if spec.init == "normal" and not spec.init_std > 0:
            raise ConfigError(f"{cfg.source}: table {spec.name}: tables.init_std (or init_stds) must be > 0 "
                              f"for init = 'normal', got {spec.init_std}")


def dropout_rates(cfg: Config) -> list[float]:
    """One rate per hidden layer, the bottom MLP's (none without dense features) then the top's."""
    m = cfg.model
    return list(m.dropout) if isinstance(m.dropout, list) else [m.dropout] * hidden_layers(cfg)


def hidden_layers(cfg: Config) -> int:
    return (len(cfg.model.bottom_mlp) if cfg.schema.dense else 0) + len(cfg.model.top_mlp)


def _validate_model(cfg: Config, specs: list[TableSpec]) -> None:
    src, m, n = cfg.source, cfg.model, hidden_layers(cfg)
    rates = dropout_rates(cfg)
    if len(rates) != n:
        raise ConfigError(f"{src}: model.dropout has {len(rates)} rates but the MLPs have {n} hidden layers "
                          f"(bottom_mlp then top_mlp{'' if cfg.schema.dense else '; no bottom MLP without dense features'})")
    if any(not 0.0 <= r < 1.0 for r in rates):
        raise ConfigError(f"{src}: model.dropout rates must be in [0, 1), got {m.dropout}")
    if m.fm and len({spec.dim for spec in specs}) > 1:
        raise ConfigError(f"{src}: model.fm needs one embedding dim for all tables, "
                          f"got {sorted({spec.dim for spec in specs})}")


def _validate_optimizer(cfg: Config) -> None:
    """One line per problem: what the chosen schedule needs, and penalties that are not >= 0."""
    src, o = cfg.source, cfg.optimizer
    if o.dense_weight_decay < 0 or o.sparse_l2 < 0:
        raise ConfigError(f"{src}: optimizer.dense_weight_decay and optimizer.sparse_l2 must be >= 0")
    if o.schedule in ("warmup", "mlperf") and o.warmup_steps < 1:
        raise ConfigError(f"{src}: optimizer.schedule = {o.schedule!r} needs optimizer.warmup_steps >= 1")
    if o.schedule in ("step", "exponential", "mlperf") and o.decay_steps < 1:
        raise ConfigError(f"{src}: optimizer.schedule = {o.schedule!r} needs optimizer.decay_steps >= 1")
    if o.schedule in ("step", "exponential", "plateau") and not 0 < o.decay_rate <= 1:
        raise ConfigError(f"{src}: optimizer.decay_rate must be in (0, 1], got {o.decay_rate}")
    if o.schedule == "mlperf" and o.decay_start_step < o.warmup_steps:
        raise ConfigError(f"{src}: optimizer.decay_start_step ({o.decay_start_step}) must be >= "
                          f"optimizer.warmup_steps ({o.warmup_steps}) for the mlperf schedule")
    if o.schedule == "plateau" and (o.plateau_patience < 1 or not cfg.eval.every_steps):
        raise ConfigError(f"{src}: optimizer.schedule = 'plateau' needs optimizer.plateau_patience >= 1 "
                          "and eval.every_steps > 0 (it reduces at periodic evaluations)")


def _validate_planner(cfg: Config, tables: list[str]) -> None:
    src, p = cfg.source, cfg.planner
    for key in ("allowed_types", "pinned_ranks"):
        unknown = sorted(set(getattr(p, key)) - set(tables))
        if unknown:
            raise ConfigError(f"{src}: planner.{key} names table(s) {', '.join(unknown)}, which are not configured")
    for table, kinds in p.allowed_types.items():
        bad = [k for k in kinds if k not in SHARDING_TYPES]
        if bad or not kinds:
            raise ConfigError(f"{src}: planner.allowed_types.{table} = {kinds!r}: each must be one of "
                              f"{', '.join(SHARDING_TYPES)}, and at least one")
    if p.pooling_factors and len(p.pooling_factors) != len(tables):
        raise ConfigError(f"{src}: planner.pooling_factors has {len(p.pooling_factors)} entries but the schema "
                          f"has {len(tables)} categorical features")
    if any(not x > 0 for x in p.pooling_factors) or p.nodes < 1 or p.batch_size < 0 or p.reserve_gb < 0:
        raise ConfigError(f"{src}: planner.pooling_factors must be > 0, planner.nodes >= 1, "
                          f"planner.batch_size and planner.reserve_gb >= 0")


def to_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("source")
    return d


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML; ``load_config`` reads it back to an equal Config."""
    # Imported here: reading configs needs only the standard library (the GPU benchmarks run on bare
    # machines that have torch and Triton but not distrec's install set).
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))
