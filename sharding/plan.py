"""Built-in placement of tables on ranks, plan checking, and plans saved as JSON.

    tables = [TableConfig("C1", 1000, 16), TableConfig("C2", 10, 16), TableConfig("C3", 50, 10)]
    plan = simple_plan(tables, world_size=4, default="table_wise", overrides={"C1": "row_wise"})
    plan.tables["C1"].shards[3]   # Shard(rank=3, row_start=750, row_end=1000, col_start=0, col_end=16)
    save_plan("plan.json", plan, tables)
    assert load_plan("plan.json", tables, world_size=4) == plan
    print(describe_plan(plan, tables))

``simple_plan`` stands in for the real planner: it knows nothing about access frequencies or memory
limits, only table sizes. ``validate_plan`` is the gate every plan (built-in, loaded or hand-made)
passes before the runtime trusts it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from sharding.types import PlanError, Shard, ShardingPlan, ShardingType, TableConfig, TablePlan

FORMAT_VERSION = 1
# Only a relative cost for balancing; the real element type is the runtime's business.
BYTES_PER_ELEMENT = 4


# --------------------------------------------------------------------------------------------------
# simple_plan


def simple_plan(tables: list[TableConfig], world_size: int, default: str | ShardingType,
                overrides: dict[str, str | ShardingType] | None = None,
                ranks_per_node: int | None = None) -> ShardingPlan:
    """One sharding type per table (``default`` unless overridden by name), placed deterministically.
    Table-row-wise tables take the nodes of ``ranks_per_node`` ranks in turn (one node: row-wise)."""
    _check_tables(tables)
    _check_world_size(world_size)
    types = _choose_types(tables, default, overrides or {})
    node = ranks_per_node or world_size
    if world_size % node:
        raise PlanError(f"{world_size} ranks do not split into nodes of {node} ranks")
    load = [0] * world_size
    plans: dict[str, TablePlan] = {}
    # Spread tables first: their shards are fixed, and the greedy table-wise pass must see their load.
    column_wise_index = table_row_wise_index = 0
    for t in tables:
        kind = types[t.name]
        if kind is ShardingType.ROW_WISE:
            shards = _row_wise_shards(t, world_size)
        elif kind is ShardingType.TABLE_ROW_WISE:
            first = (table_row_wise_index % (world_size // node)) * node
            shards = row_wise_shards(t.num_rows, t.dim, list(range(first, first + node)))
            table_row_wise_index += 1
        elif kind is ShardingType.COLUMN_WISE:
            shards = _column_wise_shards(t, world_size, offset=column_wise_index)
            column_wise_index += 1
        elif kind is ShardingType.DATA_PARALLEL:
            shards = [_full_shard(t, r) for r in range(world_size)]
        else:
            continue
        _add_load(load, shards)
        plans[t.name] = TablePlan(t.name, kind, shards)
    table_wise = [t for t in tables if types[t.name] is ShardingType.TABLE_WISE]
    # sorted() is stable, so equal-sized tables keep config order: the plan is deterministic.
    for t in sorted(table_wise, key=lambda t: t.num_rows * t.dim, reverse=True):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shards = [_full_shard(t, rank)]
        _add_load(load, shards)
        plans[t.name] = TablePlan(t.name, ShardingType.TABLE_WISE, shards)
    # Config order, so the plan (and its JSON) reads in the same order as the config.
    return ShardingPlan(world_size, {t.name: plans[t.name] for t in tables})


def parse_sharding_type(value: str | ShardingType, table: str | None = None) -> ShardingType:
    if isinstance(value, ShardingType):
        return value
    try:
        return ShardingType(value)
    except ValueError:
        valid = ", ".join(s.value for s in ShardingType)
        where = f" for table {table}" if table else ""
        raise PlanError(f"unknown sharding type {value!r}{where}; valid types: {valid}") from None


def _choose_types(tables: list[TableConfig], default: str | ShardingType,
                  overrides: dict[str, str | ShardingType]) -> dict[str, ShardingType]:
    names = {t.name for t in tables}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise PlanError(f"sharding override names table(s) {', '.join(unknown)}, which are not "
                        f"configured; configured tables: {', '.join(t.name for t in tables)}")
    base = parse_sharding_type(default)
    return {t.name: parse_sharding_type(overrides[t.name], t.name) if t.name in overrides else base
            for t in tables}


def _row_wise_shards(t: TableConfig, world_size: int) -> list[Shard]:
    return row_wise_shards(t.num_rows, t.dim, list(range(world_size)))


def row_wise_shards(num_rows: int, dim: int, ranks: list[int]) -> list[Shard]:
    """Blocks of ceil(rows / len(ranks)) rows on ``ranks`` in order; no empty shards, so a table with
    fewer rows than ranks leaves the last ranks out: ``row_wise_shards(10, 4, [2, 3])``."""
    block = -(-num_rows // len(ranks))
    return [Shard(r, i * block, min((i + 1) * block, num_rows), 0, dim)
            for i, r in enumerate(ranks) if i * block < num_rows]


def _column_wise_shards(t: TableConfig, world_size: int, offset: int) -> list[Shard]:
    n = min(world_size, t.dim)
    base, extra = divmod(t.dim, n)
    shards, start = [], 0
    for i in range(n):
        width = base + (1 if i < extra else 0)
        shards.append(Shard((i + offset) % world_size, 0, t.num_rows, start, start + width))
        start += width
    return shards


def _full_shard(t: TableConfig, rank: int) -> Shard:
    return Shard(rank, 0, t.num_rows, 0, t.dim)


def _add_load(load: list[int], shards: list[Shard]) -> None:
    for s in shards:
        load[s.rank] += s.num_rows * s.width * BYTES_PER_ELEMENT


def _check_tables(tables: list[TableConfig]) -> None:
    seen: set[str] = set()
    for t in tables:
        if t.name in seen:
            raise PlanError(f"table {t.name} is configured twice")
        seen.add(t.name)
        if t.num_rows < 1 or t.dim < 1:
            raise PlanError(f"table {t.name} has {t.num_rows} rows and dim {t.dim}; both must be >= 1")


def _check_world_size(world_size: int) -> None:
    if world_size < 1:
        raise PlanError(f"world size must be >= 1, got {world_size}")


# --------------------------------------------------------------------------------------------------
# validate_plan


def validate_plan(plan: ShardingPlan, tables: list[TableConfig], world_size: int) -> None:
    """Raise PlanError (naming the table) unless ``plan`` places every table exactly on valid ranks."""
    _check_world_size(world_size)
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


def _validate_table(tp: TablePlan, t: TableConfig, world_size: int) -> None:
    if tp.table != t.name:
        raise PlanError(f"plan entry for table {t.name} says it is for table {tp.table}")
    kind = parse_sharding_type(tp.sharding_type, t.name)
    if not tp.shards:
        raise PlanError(f"plan has no shards for table {t.name}")
    for s in tp.shards:
        _validate_shard(s, t, world_size)
    if kind is ShardingType.TABLE_WISE:
        _check_table_wise(tp.shards, t)
    elif kind in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE):
        _check_tiling(tp.shards, t, axis="row")
    elif kind is ShardingType.COLUMN_WISE:
        _check_tiling(tp.shards, t, axis="col")
    else:
        _check_data_parallel(tp.shards, t, world_size)


def _validate_shard(s: Shard, t: TableConfig, world_size: int) -> None:
    if not 0 <= s.rank < world_size:
        raise PlanError(f"plan places table {t.name} on rank {s.rank} but only {world_size} ranks exist")
    if not (0 <= s.row_start < s.row_end <= t.num_rows and 0 <= s.col_start < s.col_end <= t.dim):
        raise PlanError(f"table {t.name} has a shard rows [{s.row_start}, {s.row_end}) columns "
                        f"[{s.col_start}, {s.col_end}) that is empty or outside its "
                        f"{t.num_rows} rows x {t.dim} columns")


def _is_full(s: Shard, t: TableConfig) -> bool:
    return (s.row_start, s.row_end, s.col_start, s.col_end) == (0, t.num_rows, 0, t.dim)


def _check_table_wise(shards: list[Shard], t: TableConfig) -> None:
    if len(shards) != 1 or not _is_full(shards[0], t):
        raise PlanError(f"table-wise table {t.name} must have exactly one shard holding all its rows "
                        f"and columns, has {len(shards)} shard(s)")


def _check_tiling(shards: list[Shard], t: TableConfig, axis: str) -> None:
    """Row-wise (axis "row") or column-wise ("col") shards must span the other axis and tile this one."""
    if axis == "row":  # table-row-wise too: the node it sits on is the planner's business
        kind, size, spans = "row-wise", t.num_rows, [(s.row_start, s.row_end) for s in shards]
        full_other = all((s.col_start, s.col_end) == (0, t.dim) for s in shards)
        other = "all columns"
    else:
        kind, size, spans = "column-wise", t.dim, [(s.col_start, s.col_end) for s in shards]
        full_other = all((s.row_start, s.row_end) == (0, t.num_rows) for s in shards)
        other = "all rows"
    unit = "rows" if axis == "row" else "columns"
    if not full_other:
        raise PlanError(f"{kind} table {t.name} has a shard that does not hold {other}")
    expected = 0
    for start, end in sorted(spans):
        if start < expected:
            raise PlanError(f"{kind} table {t.name} has overlapping shards at {unit} {start}..{expected}")
        if start > expected:
            raise PlanError(f"{kind} table {t.name} has no shard for {unit} [{expected}, {start})")
        expected = end
    if expected != size:
        raise PlanError(f"{kind} table {t.name} has no shard for {unit} [{expected}, {size})")


def _check_data_parallel(shards: list[Shard], t: TableConfig, world_size: int) -> None:
    if not all(_is_full(s, t) for s in shards):
        raise PlanError(f"data-parallel table {t.name} has a shard that is not the whole table")
    ranks = sorted(s.rank for s in shards)
    if ranks != list(range(world_size)):
        missing = sorted(set(range(world_size)) - set(ranks))
        detail = (f"no replica on rank(s) {_rank_list(missing)}" if missing
                  else "more than one replica on a rank")
        raise PlanError(f"data-parallel table {t.name} needs one full replica on every rank: {detail}")


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
    path = Path(path)
    text = plan_to_json(plan, tables)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_plan(path: str | os.PathLike, tables: list[TableConfig], world_size: int) -> ShardingPlan:
    """Read a plan saved by ``save_plan`` and check it still fits these tables and this world size."""
    path = Path(path)
    doc = _read_doc(path)
    where = path.name
    if doc.get("format_version") != FORMAT_VERSION:
        raise PlanError(f"{path}: format_version is {doc.get('format_version')!r}, "
                        f"this code reads {FORMAT_VERSION}")
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
    plan = ShardingPlan(world_size, {name: _table_from_dict(where, name, e) for name, e in entries.items()})
    try:
        validate_plan(plan, tables, world_size)
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from None
    return plan


def _read_doc(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(f"sharding plan file {path} does not exist") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise PlanError(f"{path}: expected a JSON object at the top level")
    return doc


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
                     _rank_list(sorted({s.rank for s in tp.shards}))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _rank_list(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5": short even for data-parallel tables on many ranks."""
    parts, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(parts) or "-"
