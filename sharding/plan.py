"""A plan's checks and its JSON file: the gate every plan (the planners', loaded or hand-made) passes
before the runtime trusts it, and the log table that shows it.

    plan = simple_plan(tables, world_size=4, default="table_wise")      # sharding.planner
    validate_plan(plan, tables, world_size=4)      # PlanError naming the table, else None
    save_plan("plan.json", plan, tables)
    assert load_plan("plan.json", tables, world_size=4) == plan
    print(describe_plan(plan, tables))
    check_exchange("two_level", 4, world_size=8)   # PlanError unless a known exchange on whole nodes

What a valid set of shards is for each type is ``sharding.sharding_types``'s to say; this module
checks the rest (every table planned once, ranks and ranges inside the job and the table).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sharding.files import atomic_write, read_versioned_json
from sharding.sharding_types import RULES
from sharding.types import EXCHANGES, PlanError, Shard, ShardingPlan, ShardingType, TableConfig, TablePlan, rank_list

FORMAT_VERSION = 1


def parse_sharding_type(value: str | ShardingType, table: str | None = None) -> ShardingType:
    if isinstance(value, ShardingType):
        return value
    try:
        return ShardingType(value)
    except ValueError:
        valid = ", ".join(s.value for s in ShardingType)
        where = f" for table {table}" if table else ""
        raise PlanError(f"unknown sharding type {value!r}{where}; valid types: {valid}") from None


def check_tables(tables: list[TableConfig]) -> None:
    seen: set[str] = set()
    for t in tables:
        if t.name in seen:
            raise PlanError(f"table {t.name} is configured twice")
        seen.add(t.name)
        if t.num_rows < 1 or t.dim < 1:
            raise PlanError(f"table {t.name} has {t.num_rows} rows and dim {t.dim}; both must be >= 1")


def check_world_size(world_size: int) -> None:
    if world_size < 1:
        raise PlanError(f"world size must be >= 1, got {world_size}")


# --------------------------------------------------------------------------------------------------
# validate_plan


def validate_plan(plan: ShardingPlan, tables: list[TableConfig], world_size: int) -> None:
    """Raise PlanError (naming the table) unless ``plan`` places every table exactly on valid ranks."""
    check_world_size(world_size)
    if plan.world_size != world_size:
        raise PlanError(f"plan was made for {plan.world_size} ranks, this job has {world_size}")
    configured = {t.name: t for t in tables}
    for name in configured:
        if name not in plan.tables:
            raise PlanError(f"table {name} is configured but not in the plan")
    for name in plan.tables:
        if name not in configured:
            raise PlanError(f"table {name} is in the plan but not configured")
    for t in tables:
        _validate_table(plan.tables[t.name], t, world_size)
    check_exchange(plan.exchange, plan.ranks_per_node, world_size)


def check_exchange(exchange, ranks_per_node, world_size: int) -> None:
    """PlanError unless ``exchange`` is one of EXCHANGES and a two-level one has a node size that
    splits the ranks into whole nodes."""
    if exchange not in EXCHANGES:
        raise PlanError(f"unknown exchange {exchange!r}; valid exchanges: {', '.join(EXCHANGES)}")
    if exchange == "two_level" and not (isinstance(ranks_per_node, int) and ranks_per_node >= 1
                                        and world_size % ranks_per_node == 0):
        raise PlanError(f"two_level exchange needs ranks_per_node, a whole number of ranks per node dividing "
                        f"the {world_size} ranks, got {ranks_per_node!r}")


def _validate_table(tp: TablePlan, t: TableConfig, world_size: int) -> None:
    if tp.table != t.name:
        raise PlanError(f"plan entry for table {t.name} says it is for table {tp.table}")
    kind = parse_sharding_type(tp.sharding_type, t.name)
    if not tp.shards:
        raise PlanError(f"plan has no shards for table {t.name}")
    for s in tp.shards:
        _validate_shard(s, t, world_size)
    RULES[kind].check(tp.shards, t, world_size)


def _validate_shard(s: Shard, t: TableConfig, world_size: int) -> None:
    if s.rank is None or not 0 <= s.rank < world_size:
        raise PlanError(f"plan places table {t.name} on rank {s.rank} but only {world_size} ranks exist")
    if not (0 <= s.row_start < s.row_end <= t.num_rows and 0 <= s.col_start < s.col_end <= t.dim):
        raise PlanError(f"table {t.name} has a shard rows [{s.row_start}, {s.row_end}) columns "
                        f"[{s.col_start}, {s.col_end}) that is empty or outside its "
                        f"{t.num_rows} rows x {t.dim} columns")


# --------------------------------------------------------------------------------------------------
# JSON


def table_hash(tables: list[TableConfig]) -> str:
    """Fingerprint of what a plan depends on, so a plan made for other tables is never reused."""
    key = sorted((t.name, t.num_rows, t.dim, t.pooling) for t in tables)
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def plan_to_json(plan: ShardingPlan, tables: list[TableConfig]) -> str:
    # Refuse to write a plan that load_plan would reject: the error belongs where the plan was made.
    validate_plan(plan, tables, plan.world_size)
    doc = {
        "format_version": FORMAT_VERSION,
        "world_size": plan.world_size,
        "table_hash": table_hash(tables),
        "exchange": plan.exchange,
        **({"ranks_per_node": plan.ranks_per_node} if plan.ranks_per_node is not None else {}),
        "tables": {t.name: _table_to_dict(plan.tables[t.name], t) for t in tables},
    }
    return json.dumps(doc, indent=2) + "\n"


def _table_to_dict(tp: TablePlan, t: TableConfig) -> dict:
    return {
        "sharding_type": parse_sharding_type(tp.sharding_type, t.name).value,
        "num_rows": t.num_rows,
        "dim": t.dim,
        # Not strictly needed to rebuild the plan; kept so a pooling change can be pinned on a table.
        "pooling": t.pooling,
        "shards": [{"rank": s.rank, "row_start": s.row_start, "row_end": s.row_end,
                    "col_start": s.col_start, "col_end": s.col_end} for s in tp.shards],
    }


def save_plan(path: str | os.PathLike, plan: ShardingPlan, tables: list[TableConfig]) -> None:
    """Write atomically, so a crash mid-write never leaves a half plan for the next job to load."""
    atomic_write(path, plan_to_json(plan, tables))


def load_plan(path: str | os.PathLike, tables: list[TableConfig], world_size: int) -> ShardingPlan:
    """Read a plan saved by ``save_plan`` and check it still fits these tables and this world size."""
    path = Path(path)
    doc = read_versioned_json(path, "format_version", FORMAT_VERSION, PlanError, "sharding plan")
    where = path.name
    if doc.get("world_size") != world_size:
        raise PlanError(f"{where} was made for {doc.get('world_size')} ranks, this job has {world_size}")
    entries = doc.get("tables")
    if not isinstance(entries, dict):
        raise PlanError(f"{path}: has no 'tables' object")
    _compare_tables(where, entries, tables)
    if doc.get("table_hash") != table_hash(tables):
        # Every entry matched rows and dim, so a pooling left out of the file changed, or it was edited.
        raise PlanError(f"{where}: table_hash does not match the configured tables "
                        f"({', '.join(t.name for t in tables)}); was a table's pooling changed?")
    # A file written before the exchange was recorded says none: flat, as it ran then.
    plan = ShardingPlan(world_size, {name: _table_from_dict(where, name, e) for name, e in entries.items()},
                        doc.get("exchange", "flat"), doc.get("ranks_per_node"))
    try:
        validate_plan(plan, tables, world_size)
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from None
    return plan


def _compare_tables(where: str, entries: dict, tables: list[TableConfig]) -> None:
    """Name the first table whose shape differs between the file and the config."""
    for t in tables:
        e = entries.get(t.name)
        if e is None:
            raise PlanError(f"{where}: table {t.name} is configured but not in the plan")
        if not isinstance(e, dict):
            raise PlanError(f"{where}: table {t.name}'s entry is not a JSON object")
        for key in ("num_rows", "dim"):
            if key not in e:
                raise PlanError(f"{where}: table {t.name} has no {key!r} in the plan")
        if e["num_rows"] != t.num_rows:
            raise PlanError(f"{where}: table {t.name} has {e['num_rows']} rows in the plan but "
                            f"{t.num_rows} in the config")
        if e["dim"] != t.dim:
            raise PlanError(f"{where}: table {t.name} has dim {e['dim']} in the plan but "
                            f"{t.dim} in the config")
        # Optional: a hand-written plan may leave it out, and then only table_hash guards it.
        if e.get("pooling", t.pooling) != t.pooling:
            raise PlanError(f"{where}: table {t.name} has pooling {e['pooling']!r} in the plan but "
                            f"{t.pooling!r} in the config")
    configured = {t.name for t in tables}
    for name in entries:
        if name not in configured:
            raise PlanError(f"{where}: table {name} is in the plan but not configured")


def _table_from_dict(where: str, name: str, e: dict) -> TablePlan:
    try:
        kind = parse_sharding_type(e.get("sharding_type", "<missing>"), name)
    except PlanError as err:
        raise PlanError(f"{where}: {err}") from None
    try:
        shards = [Shard(int(s["rank"]), int(s["row_start"]), int(s["row_end"]),
                        int(s["col_start"]), int(s["col_end"])) for s in e["shards"]]
    except (KeyError, TypeError, ValueError) as err:
        raise PlanError(f"{where}: table {name} has malformed shards ({err!r})") from None
    return TablePlan(name, kind, shards)


# --------------------------------------------------------------------------------------------------
# describe_plan


def describe_plan(plan: ShardingPlan, tables: list[TableConfig]) -> str:
    """One aligned line per table (config order, then any unconfigured plan tables) for the logs."""
    rows = [("table", "rows", "dim", "type", "ranks")]
    by_name = {t.name: t for t in tables}
    names = [t.name for t in tables if t.name in plan.tables]
    names += [n for n in plan.tables if n not in by_name]
    for name in names:
        tp = plan.tables[name]
        t = by_name.get(name)
        kind = tp.sharding_type.value if isinstance(tp.sharding_type, ShardingType) else str(tp.sharding_type)
        rows.append((name, str(t.num_rows) if t else "?", str(t.dim) if t else "?", kind,
                     rank_list(sorted({s.rank for s in tp.shards}))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

