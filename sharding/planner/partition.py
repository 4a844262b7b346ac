"""Placement search: one option per table and a rank per shard, so that the slowest rank's estimated
step time is as low as the search finds, within every rank's memory.

    search = Search(tables, options, topo, work)       # options: enumerate_options per table
    search.run()
    search.choice[i], search.ranks[i]                   # table i's option index and its shards' ranks

Greedy, no exhaustive search (thousands of tables, hundreds of ranks):

1. each table takes its option with the least total work (sum over its shards of lookup and
   all-to-all seconds) among those whose largest shard fits a share of an empty rank's memory;
2. a table with a shard slower than the mean rank's share of all work is split (the least-work option
   whose shards are not);
3. row-wise and replicated shards sit where they must; the others go largest first (by time or
   memory, whichever is the larger share of a rank) onto the least-loaded rank with room;
4. local search on the slowest rank: move one of its shards to the rank where it ends fastest, or
   give one of its tables another option (split further, replicate), while that lowers the slowest
   rank's time; then move shards off the fullest rank, or swap them with smaller shards of other
   ranks, where no rank gets slower than the slowest;
5. every table tries every other option in place; those results explain the plan.

If shards do not pack into memory, steps 1-3 run again with smaller shards (a smaller share of a
rank per shard), down to 1/W. Each shard's cost comes down to a ``Hot`` (five numbers); per rank the
search keeps their sums in ``Columns``, numpy arrays over the ranks (``estimate.RankModel.times`` turns
them into time), so that trying a table on every rank costs a few array operations, not a Python loop
over the ranks: 10,000 tables on 256 ranks plan in seconds (docs/benchmarks.md). The arrays add in the
same order as a loop would, so plans do not depend on it.
"""
from __future__ import annotations

import operator
from collections import Counter
from typing import NamedTuple

import numpy as np

from sharding.planner.estimate import PieceCost, RankModel, alltoall_seconds_per_byte, piece_cost, requester_bytes
from sharding.planner.types import ShardOption, Topology, Workload, human_bytes
from sharding.sharding_types import ANY, EVERY, LISTED, NODE, ROWS, RULES
from sharding.types import ShardingType, TableConfig

# A shard slower than this fraction of the mean rank's work is split before placement: one piece
# larger than the mean would make its rank the slowest whatever else goes where.
SPLIT_FRACTION = 1.0
# Largest shard, as a share of an empty rank's free memory, tried in turn until the shards pack.
PIECE_MEMORY_SHARES = (1.0, 0.5, 0.25, 0.125, 0.0625)
LOCAL_SEARCH_CANDIDATES = 4  # the slowest rank's largest shards tried per local-search step
MAX_LOCAL_STEPS_PER_TABLE = 4
MAX_MEMORY_STEPS_PER_RANK = 8  # moves and swaps off the fullest rank (each lowers it or moves it)
MAX_FINAL_PASSES = 3  # passes over all tables trying every other option (they also explain the plan)
# The final passes take another option only for this much less step time (a fraction): smaller gains
# are below what the model can tell apart, and each one makes the tables tried before it be tried again.
FINAL_PASS_MIN_GAIN = 1e-3
EPS_S = 1e-12
VECTOR_FROM_SHARDS = 4  # options with this many shards or more are added to the columns as arrays


class Hot(NamedTuple):
    """What the search adds up per rank of one shard's ``PieceCost``."""

    seconds: float  # lookup forward and backward, all-reduce
    ids: float  # owner-side all-to-all bytes: ids in
    out: float  # pooled rows out
    grad: float  # pooled gradients in
    mem: float  # bytes held

    @classmethod
    def of(cls, c: PieceCost) -> "Hot":
        return cls(c.lookup_fwd_s + c.lookup_bwd_s + c.allreduce_s, c.ids_in, c.pooled_out, c.grads_in, c.memory)


MEM = Hot._fields.index("mem")


class Columns:
    """Per-rank sums of the shards' ``Hot`` costs, one float64 array per field (rank r: ``cols.mem[r]``)."""

    __slots__ = Hot._fields

    def __init__(self, world_size: int):
        for name in self.__slots__:
            setattr(self, name, np.zeros(world_size))

    def copy(self) -> "Columns":
        other = Columns(0)
        for name in self.__slots__:
            setattr(other, name, getattr(self, name).copy())
        return other

    def add(self, r: int, h: Hot, sign: float = 1) -> None:
        self.seconds[r] += sign * h.seconds
        self.ids[r] += sign * h.ids
        self.out[r] += sign * h.out
        self.grad[r] += sign * h.grad
        self.mem[r] += sign * h.mem

    def add_columns(self, delta: "Columns", sign: int) -> None:
        """Every rank at once (an option with a shard on every rank)."""
        op = operator.iadd if sign > 0 else operator.isub
        for name in self.__slots__:
            op(getattr(self, name), getattr(delta, name))

    def times(self, model: RankModel) -> np.ndarray:
        return model.times(self.seconds, self.ids, self.out, self.grad)

    def times_with(self, model: RankModel, ranks: np.ndarray, h: Hot) -> np.ndarray:
        """The time of each of ``ranks`` if it also held ``h``."""
        return model.times(self.seconds[ranks] + h.seconds, self.ids[ranks] + h.ids, self.out[ranks] + h.out,
                           self.grad[ranks] + h.grad)


class Movable:
    """The shards the memory spreading may move or swap (placement ANY over every rank) as arrays over
    the shards: a swap partner for one shard is a few array operations among thousands of shards."""

    def __init__(self, search: "Search"):
        w = search.topo.world_size
        self.slots = [(ti, pi) for r in range(w) for ti, pi in sorted(search.on_rank[r])
                      if len(search.options[ti][search.choice[ti]].ranks) == w]
        self.index = {slot: k for k, slot in enumerate(self.slots)}
        hot = np.array([search.costs[ti][search.choice[ti]][pi] for ti, pi in self.slots], dtype=np.float64)
        self.seconds, self.ids, self.out, self.grad, self.mem = hot.reshape(-1, len(Hot._fields)).T
        self.rank = np.array([search.ranks[ti][pi] for ti, pi in self.slots], dtype=np.intp)
        self.table = np.array([ti for ti, _ in self.slots], dtype=np.intp)

    def moved(self, ti: int, pi: int, dst: int) -> None:
        k = self.index.get((ti, pi))
        if k is not None:
            self.rank[k] = dst


class Aggregate:
    """What every rank pays for the current choices (requester-side bytes, routing, replica widths),
    kept up to date as options change, so the rank model costs O(1) to rebuild."""

    def __init__(self, topo: Topology, work: Workload):
        self.topo, self.work = topo, work
        self.requester = [0.0, 0.0, 0.0]
        self.ids, self.sharded, self.widths = 0.0, 0, Counter()
        self._bytes: dict[int, tuple[float, float, float]] = {}  # requester bytes by id(option)

    def add(self, t: TableConfig, option: ShardOption, sign: int = 1) -> None:
        key = id(option)  # options live as long as the search
        if key not in self._bytes:
            self._bytes[key] = requester_bytes(t, option, self.work)
        for i, x in enumerate(self._bytes[key]):
            self.requester[i] += sign * x
        if RULES[option.kind].replicated:
            self.widths[t.dim] += sign
        else:
            self.ids += sign * self.work.batch_per_rank * self.work.pooling_factor(t.name)
            self.sharded += sign

    def model(self) -> RankModel:
        widths = sum(1 for n in self.widths.values() if n > 0)
        return RankModel(self.topo, self.work, tuple(self.requester), self.ids, widths, self.sharded > 0)


class Search:
    def __init__(self, tables: list[TableConfig], options: list[list[ShardOption]], topo: Topology,
                 work: Workload):
        self.tables, self.options, self.topo, self.work = tables, options, topo, work
        self.s_per_byte = alltoall_seconds_per_byte(topo)
        self.costs = [[self._option_costs(t, o) for o in opts] for t, opts in zip(tables, options)]
        self.work_s, self._max_mem, self._max_s = [], [], []
        for per in self.costs:
            work, top_mem, top_s = [], [], []
            for cs in per:
                distinct = dict(zip(map(id, cs), cs))  # row shards and replicas repeat one or two costs
                seconds = {k: self.piece_s(h) for k, h in distinct.items()}
                work.append(sum(map(seconds.__getitem__, map(id, cs))))  # in shard order, as a loop would
                top_mem.append(max(h.mem for h in distinct.values()))
                top_s.append(max(seconds.values()))
            self.work_s.append(work)
            self._max_mem.append(top_mem)
            self._max_s.append(top_s)
        self._deltas: dict[tuple[int, int], Columns] = {}  # see _everywhere
        self._rank_arrays: dict[tuple[int, int], np.ndarray] = {}  # see rank_array
        self._cost_arrays: dict[tuple[int, int], np.ndarray] = {}  # see cost_array
        self.reset()

    def reset(self) -> None:
        n, w = len(self.tables), self.topo.world_size
        self.choice = [min(range(len(o)), key=lambda oi, i=i: self.work_s[i][oi]) for i, o in enumerate(self.options)]
        self.ranks: list[list[int] | None] = [None] * n
        self.reason = [""] * n
        self.too_big: set[int] = set()  # tables no option of which fits an empty rank
        self.unplaced: list[int] = []
        self.cols = Columns(w)
        self.on_rank: list[set[tuple[int, int]]] = [set() for _ in range(w)]
        self.agg = Aggregate(self.topo, self.work)
        for t, opts, oi in zip(self.tables, self.options, self.choice):
            self.agg.add(t, opts[oi])
        self.model: RankModel = self.agg.model()
        self.alternatives: list[list[tuple[int, float | None]]] = []
        self.movable: Movable | None = None  # while spreading memory

    # ---- costs ------------------------------------------------------------------------------------
    def _option_costs(self, t: TableConfig, option: ShardOption) -> list[Hot]:
        shards = option.shards
        if len(shards) > 2 and RULES[option.kind].axis == ROWS:  # row_cut: equal blocks, the last one shorter
            first, last = (Hot.of(piece_cost(t, p, option.kind, self.work, self.topo)) for p in (shards[0], shards[-1]))
            return [first] * (len(shards) - 1) + [last]
        if len(shards) > 2 and len(set(map(id, shards))) == 1:  # replicas: one shard, W times
            return [Hot.of(piece_cost(t, shards[0], option.kind, self.work, self.topo))] * len(shards)
        cache: dict[tuple[int, int], Hot] = {}  # column shards repeat a width or two
        out = []
        for p in shards:
            key = (p.num_rows, p.width)
            if key not in cache:
                cache[key] = Hot.of(piece_cost(t, p, option.kind, self.work, self.topo))
            out.append(cache[key])
        return out

    def piece_s(self, h: Hot) -> float:
        return h.seconds + (h.ids + h.out + h.grad) * self.s_per_byte

    def max_piece_mem(self, ti: int, oi: int) -> float:
        return self._max_mem[ti][oi]

    def max_piece_s(self, ti: int, oi: int) -> float:
        return self._max_s[ti][oi]

    def cost_array(self, ti: int, oi: int) -> np.ndarray:
        """Option ``oi``'s shard costs as a [shard, Hot field] array (cached)."""
        key = (ti, oi)
        if key not in self._cost_arrays:
            costs = self.costs[ti][oi]
            distinct = dict(zip(map(id, costs), range(len(costs))))  # row shards and replicas: one or two
            rows = np.array([costs[k] for k in distinct.values()], dtype=np.float64)
            code = dict(zip(distinct, range(len(distinct))))
            self._cost_arrays[key] = rows[list(map(code.__getitem__, map(id, costs)))]
        return self._cost_arrays[key]

    def rank_array(self, ti: int, oi: int) -> np.ndarray:
        """Option ``oi``'s candidate (or listed) ranks as an index array (cached)."""
        key = (ti, oi)
        if key not in self._rank_arrays:
            self._rank_arrays[key] = np.array(self.options[ti][oi].ranks, dtype=np.intp)
        return self._rank_arrays[key]

    def free_bytes(self, rank: int) -> float:
        return float(self.model.free_bytes() - self.cols.mem[rank])

    def times(self) -> np.ndarray:
        return self.cols.times(self.model)

    def overfull(self) -> list[int]:
        return np.flatnonzero(self.cols.mem > self.model.free_bytes()).tolist()

    def feasible(self) -> bool:
        return not (self.too_big or self.unplaced or self.overfull())

    # ---- the stages -------------------------------------------------------------------------------
    def run(self) -> None:
        if self.place():
            self._local_search()
            self._spread_memory()
            self.alternatives = self._final_passes()

    def place(self) -> bool:
        """Steps 1-3, with smaller shards until they pack; whether every shard has a rank with room
        (the rest only moves shards where they fit, so this is what decides feasibility)."""
        for share in PIECE_MEMORY_SHARES:
            self.reset()
            self._choose(share)
            self._split_large()
            self._place_all()
            if self.feasible() or self.too_big:
                break
        return self.feasible()

    def _spread_memory(self) -> None:
        """Lower the fullest rank's memory where that keeps every rank below the slowest rank's time:
        move one of its shards to a rank with less, else swap it with a smaller shard of another rank
        (a balanced plan has no rank with time to spare for a move). The step time stays, memory
        headroom grows."""
        self.movable = Movable(self)
        for _ in range(MAX_MEMORY_STEPS_PER_RANK * self.topo.world_size):
            m, worst = int(np.argmax(self.cols.mem)), float(self.times().max())
            pieces = sorted(self.on_rank[m], key=lambda x: -self.costs[x[0]][self.choice[x[0]]][x[1]].mem)
            pieces = pieces[:LOCAL_SEARCH_CANDIDATES]
            if not (any(self._move_for_memory(ti, pi, m, worst) for ti, pi in pieces)
                    or any(self._swap_for_memory(ti, pi, m, worst) for ti, pi in pieces)):
                break
        self.movable = None

    def _final_passes(self) -> list[list[tuple[int, float | None]]]:
        """Try every other option of every table in place (the rest where it is); take one that lowers
        the slowest rank. Returns each table's alternatives as (option, slowest rank's seconds or None
        when it does not fit), each computed after the last change, so they explain the final plan:
        tables tried before a change are tried again (the last pass only explains)."""
        out: list = [None] * len(self.tables)
        tried_at = [0] * len(self.tables)  # when each table's alternatives were computed
        clock, last_change, pending = 0, 0, list(range(len(self.tables)))
        for n in range(MAX_FINAL_PASSES + 1):
            for ti in pending:
                clock += 1
                out[ti], changed = self._alternatives(ti, improve=n < MAX_FINAL_PASSES)
                tried_at[ti] = clock
                last_change = clock if changed else last_change
            pending = [ti for ti in range(len(self.tables)) if tried_at[ti] < last_change]
            if not pending:
                break
        return out

    def _alternatives(self, ti: int, improve: bool) -> tuple[list[tuple[int, float | None]], bool]:
        alts = [(oi, self.trial(ti, oi)) for oi in range(len(self.options[ti])) if oi != self.choice[ti]]
        worst = float(self.times().max())
        better = [(after, oi) for oi, after in alts if after is not None and after < worst * (1 - FINAL_PASS_MIN_GAIN)]
        if not (better and improve):
            return alts, False
        keep = self.options[ti][self.choice[ti]].label
        self._take(ti, min(better)[1])
        self.reason[ti] = f"balance: {keep} left the slowest rank at {worst * 1e3:.2f} ms"
        return [(oi, self.trial(ti, oi)) for oi in range(len(self.options[ti])) if oi != self.choice[ti]], True

    def _choose(self, share: float) -> None:
        empty = self.model.free_bytes()
        for ti in range(len(self.tables)):
            cheapest, n = self.choice[ti], len(self.options[ti])
            fits = [oi for oi in range(n) if self.max_piece_mem(ti, oi) <= empty]
            if not fits:
                self.too_big.add(ti)
                continue
            small = [oi for oi in fits if self.max_piece_mem(ti, oi) <= share * empty]
            best = min(small, key=lambda oi: self.work_s[ti][oi]) if small else \
                min(fits, key=lambda oi: self.max_piece_mem(ti, oi))
            self.reason[ti] = self._memory_reason(ti, cheapest, empty) if best != cheapest else self._cost_reason(ti, best)
            self._switch(ti, best)
        self.model = self.agg.model()

    def _memory_reason(self, ti: int, cheapest: int, empty: float) -> str:
        need, label = self.max_piece_mem(ti, cheapest), self.options[ti][cheapest].label
        if need > empty:
            return f"memory: {label} needs {human_bytes(need)} on one rank, {human_bytes(empty)} free"
        return f"memory: {label}'s {human_bytes(need)} shards did not pack into the ranks with the rest"

    def _cost_reason(self, ti: int, oi: int) -> str:
        if self.options[ti][oi].kind is ShardingType.DATA_PARALLEL:
            return "cost: small, replicated (no all-to-all)"
        return "cost: least total work"

    def _switch(self, ti: int, oi: int) -> None:
        t = self.tables[ti]
        self.agg.add(t, self.options[ti][self.choice[ti]], -1)
        self.choice[ti] = oi
        self.agg.add(t, self.options[ti][oi])

    def _mean_work(self) -> float:
        return sum(self.work_s[ti][self.choice[ti]] for ti in range(len(self.tables))) / self.topo.world_size

    def _split_large(self) -> None:
        empty = self.model.free_bytes()
        for _ in range(3):  # splitting adds work, which moves the mean: settle in a few rounds
            mean, changed = self._mean_work(), False
            for ti in range(len(self.tables)):
                if ti not in self.too_big and self.max_piece_s(ti, self.choice[ti]) > SPLIT_FRACTION * mean:
                    changed |= self._split_below(ti, SPLIT_FRACTION * mean, empty)
            if not changed:
                break
        self.model = self.agg.model()

    def _split_below(self, ti: int, limit: float, empty: float) -> bool:
        fits = [oi for oi in range(len(self.options[ti])) if self.max_piece_mem(ti, oi) <= empty]
        small = [oi for oi in fits if self.max_piece_s(ti, oi) <= limit]
        best = min(small, key=lambda oi: self.work_s[ti][oi]) if small else \
            min(fits, key=lambda oi: self.max_piece_s(ti, oi))
        if best == self.choice[ti]:
            return False
        old = self.options[ti][self.choice[ti]].label
        self.reason[ti] = (f"balance: {old} would put {self.max_piece_s(ti, self.choice[ti]) * 1e3:.2f} ms on one "
                           f"rank, the mean rank's work is {limit / SPLIT_FRACTION * 1e3:.2f} ms")
        self._switch(ti, best)
        return True

    # ---- placement --------------------------------------------------------------------------------
    def _placement(self, ti: int, oi: int | None = None) -> str:
        return RULES[self.options[ti][self.choice[ti] if oi is None else oi].kind].placement

    def _movable(self, ti: int) -> bool:
        """Its shards may go to any rank: the local search moves them one at a time."""
        return self._placement(ti) == ANY

    def _fixed(self, ti: int) -> bool:
        """Its shards' ranks are given by the option: placed before the others, never moved."""
        return self._placement(ti) in (LISTED, EVERY)

    def _place_all(self) -> None:
        order = [ti for ti in range(len(self.tables)) if ti not in self.too_big]
        for ti in (ti for ti in order if self._fixed(ti)):
            self._add(ti, list(self.options[ti][self.choice[ti]].ranks))
        rest = [ti for ti in order if not self._fixed(ti)]
        per_rank_s, empty = max(self._mean_work(), EPS_S), max(self.model.free_bytes(), 1.0)
        rest.sort(key=lambda ti: max(self.max_piece_s(ti, self.choice[ti]) / per_rank_s,
                                     self.max_piece_mem(ti, self.choice[ti]) / empty), reverse=True)
        for ti in rest:
            ranks = self._fit(ti)
            if ranks is None:
                ranks = self._fit_other(ti)
            if ranks is None:
                self.unplaced.append(ti)
            else:
                self._add(ti, ranks)

    def _fit(self, ti: int, oi: int | None = None, cols: Columns | None = None,
             model: RankModel | None = None) -> list[int] | None:
        """Ranks for option ``oi``'s shards (default: the chosen one) given per-rank ``cols`` and
        ``model`` (default: the current ones), or None when they do not fit."""
        oi = self.choice[ti] if oi is None else oi
        cols, model = cols or self.cols, model or self.model
        option, costs, free, mem = self.options[ti][oi], self.costs[ti][oi], model.free_bytes(), cols.mem
        placement, at = self._placement(ti, oi), self.rank_array(ti, oi)
        if placement in (LISTED, EVERY):
            fits = (free - mem[at] >= self.cost_array(ti, oi)[:, MEM]).all()  # shard i on the i-th rank
            return list(option.ranks) if fits else None
        times = cols.times(model)
        if placement == NODE:
            return self._fit_node(option, costs, times, free, mem)
        if len(costs) == 1:  # most tables: the least loaded rank (the lower on ties), if it has room
            r = int(at[np.argmin(times[at])])
            if free - mem[r] >= costs[0].mem:
                return [r]
        order = at[np.argsort(times[at], kind="stable")]  # stable: ties go to the lower rank
        if len(set(map(id, costs))) == 1:  # equal shards (column counts divide the dim): the first with room
            roomy = order[free - mem[order] >= costs[0].mem]
            return roomy[:len(costs)].tolist() if len(roomy) >= len(costs) else None
        order, room = order.tolist(), (free - mem).tolist()
        ranks: list[int] = []
        for h in costs:
            r = next((r for r in order if room[r] >= h.mem and r not in ranks), None)
            if r is None:
                return None
            ranks.append(r)
        return ranks

    def _fit_node(self, option: ShardOption, costs, times: np.ndarray, free: float, mem: np.ndarray):
        """The node whose slowest rank is least loaded among those with room (template: node 0's ranks)."""
        template = np.array(option.ranks[:len(costs)], dtype=np.intp)
        ranks = template + (np.arange(self.topo.nodes) * self.topo.ranks_per_node)[:, None]  # [node, shard]
        fits = (free - mem[ranks] >= np.array([h.mem for h in costs])).all(axis=1)
        if not fits.any():
            return None
        load = np.where(fits, times[ranks].max(axis=1), np.inf)
        return ranks[int(np.argmin(load))].tolist()  # the lower node on ties

    def _fit_other(self, ti: int) -> list[int] | None:
        """The chosen option found no room: try the others, least work first."""
        keep = self.choice[ti]
        for oi in sorted(range(len(self.options[ti])), key=lambda oi: self.work_s[ti][oi]):
            if oi != keep:
                self._switch(ti, oi)
                self.model = self.agg.model()
                ranks = self._fit(ti)
                if ranks is not None:
                    self.reason[ti] = f"memory: {self.options[ti][keep].label} found no rank with room left"
                    return ranks
        self._switch(ti, keep)
        self.model = self.agg.model()
        return None

    def _add(self, ti: int, ranks: list[int], sign: int = 1) -> None:
        self._apply(self.cols, ti, self.choice[ti], ranks, sign)
        if self._movable(ti):
            for pi, r in enumerate(ranks):
                (self.on_rank[r].add if sign > 0 else self.on_rank[r].discard)((ti, pi))
        self.ranks[ti] = ranks if sign > 0 else None

    def _apply(self, cols: Columns, ti: int, oi: int, ranks: list[int], sign: int) -> None:
        """Add (sign 1) or take away (-1) option ``oi``'s shards on ``ranks`` to the per-rank ``cols``."""
        if len(ranks) == self.topo.world_size and self._placement(ti, oi) in (LISTED, EVERY):
            cols.add_columns(self._everywhere(ti, oi), sign)  # a shard on every rank: whole columns at once
            return
        if len(ranks) < VECTOR_FROM_SHARDS:
            for r, h in zip(ranks, self.costs[ti][oi]):
                cols.add(r, h, sign)
            return
        per_shard = self.cost_array(ti, oi)
        for f, name in enumerate(Hot._fields):  # a table's shards are on distinct ranks
            getattr(cols, name)[ranks] += per_shard[:, f] if sign > 0 else -per_shard[:, f]

    def _everywhere(self, ti: int, oi: int) -> Columns:
        """Per-rank columns of an option with a shard on every rank (cached: trials reuse them)."""
        key = (ti, oi)
        if key not in self._deltas:
            delta, per_shard = Columns(self.topo.world_size), self.cost_array(ti, oi)
            for f, name in enumerate(Hot._fields):
                getattr(delta, name)[self.rank_array(ti, oi)] = per_shard[:, f]
            self._deltas[key] = delta
        return self._deltas[key]

    # ---- local search -----------------------------------------------------------------------------
    def _local_search(self) -> None:
        for _ in range(MAX_LOCAL_STEPS_PER_TABLE * len(self.tables) + self.topo.world_size):
            if not self._improve_once():
                break

    def _improve_once(self) -> bool:
        times = self.times()
        b = int(np.argmax(times))
        pieces = sorted(self.on_rank[b], key=lambda x: -self.piece_s(self.costs[x[0]][self.choice[x[0]]][x[1]]))
        pieces = pieces[:LOCAL_SEARCH_CANDIDATES]
        if any(self._try_move(ti, pi, b, times) for ti, pi in pieces):
            return True
        return any(self._try_other(ti, times[b]) for ti in dict.fromkeys(ti for ti, _ in pieces))

    def _try_move(self, ti: int, pi: int, b: int, times: np.ndarray) -> bool:
        """Move the shard to the rank where it ends fastest, if that is below the slowest rank now."""
        h, at = self.costs[ti][self.choice[ti]][pi], self.rank_array(ti, self.choice[ti])
        after = self.cols.times_with(self.model, at, h)
        after[(self.model.free_bytes() - self.cols.mem[at] < h.mem) | np.isin(at, self.ranks[ti])] = np.inf
        k = int(np.argmin(after))  # the lower rank on ties
        if not after[k] < times[b] - EPS_S:
            return False
        self._move(ti, pi, b, int(at[k]))
        return True

    def _move_for_memory(self, ti: int, pi: int, m: int, worst: float) -> bool:
        h, at, cols = self.costs[ti][self.choice[ti]][pi], self.rank_array(ti, self.choice[ti]), self.cols
        ok = (cols.mem[at] + h.mem < cols.mem[m]) & ~np.isin(at, self.ranks[ti]) \
            & (cols.times_with(self.model, at, h) < worst - EPS_S)
        if not ok.any():
            return False
        mem = np.where(ok, cols.mem[at], np.inf)
        self._move(ti, pi, m, int(at[np.argmin(mem)]))  # the emptiest such rank, the lower on ties
        return True

    def _swap_for_memory(self, ti: int, pi: int, m: int, worst: float) -> bool:
        """Swap shard ``pi`` of table ``ti`` (on the fullest rank ``m``) with a smaller shard of another
        rank r, the one that leaves the larger of the two ranks emptiest, where both stay below
        ``worst`` and below ``m``'s memory now."""
        mv, cols, h = self.movable, self.cols, self.costs[ti][self.choice[ti]][pi]
        if (ti, pi) not in mv.index:
            return False
        r = mv.rank
        mem_r, mem_m = cols.mem[r] - mv.mem + h.mem, cols.mem[m] - h.mem + mv.mem
        ok = (r != m) & (mv.mem < h.mem) & (np.maximum(mem_r, mem_m) < cols.mem[m]) & ~np.isin(r, self.ranks[ti]) \
            & ~np.isin(mv.table, [t for t, _ in self.on_rank[m]])  # a table's shards stay on distinct ranks
        if not ok.any():
            return False
        time_m = self.model.times(cols.seconds[m] - h.seconds + mv.seconds, cols.ids[m] - h.ids + mv.ids,
                                  cols.out[m] - h.out + mv.out, cols.grad[m] - h.grad + mv.grad)
        time_r = self.model.times(cols.seconds[r] - mv.seconds + h.seconds, cols.ids[r] - mv.ids + h.ids,
                                  cols.out[r] - mv.out + h.out, cols.grad[r] - mv.grad + h.grad)
        ok &= (time_m < worst - EPS_S) & (time_r < worst - EPS_S)
        if not ok.any():
            return False
        k = int(np.argmin(np.where(ok, np.maximum(mem_r, mem_m), np.inf)))
        (tj, pj), dst = mv.slots[k], int(r[k])
        self._move(ti, pi, m, dst)
        self._move(tj, pj, dst, m)
        return True

    def _move(self, ti: int, pi: int, src: int, dst: int) -> None:
        h = self.costs[ti][self.choice[ti]][pi]
        self.cols.add(src, h, -1)
        self.cols.add(dst, h)
        self.on_rank[src].discard((ti, pi))
        self.on_rank[dst].add((ti, pi))
        self.ranks[ti][pi] = dst
        if self.movable is not None:
            self.movable.moved(ti, pi, dst)

    def _try_other(self, ti: int, worst: float) -> bool:
        """Give the table another option (split further, replicate, ...) if the slowest rank gains."""
        keep = self.choice[ti]
        for oi in sorted(range(len(self.options[ti])), key=lambda oi: self.work_s[ti][oi]):
            after = self.trial(ti, oi) if oi != keep else None
            if after is not None and after < worst - EPS_S:
                self._take(ti, oi)
                self.reason[ti] = (f"balance: {self.options[ti][keep].label} left its rank the slowest at "
                                   f"{worst * 1e3:.2f} ms")
                return True
        return False

    def trial(self, ti: int, oi: int) -> float | None:
        """The slowest rank's time if table ``ti`` took option ``oi`` (placed greedily), every other
        table where it is; None: no room. Changes nothing."""
        t, keep = self.tables[ti], self.options[ti][self.choice[ti]]
        self.agg.add(t, keep, -1)
        self.agg.add(t, self.options[ti][oi])
        model = self.agg.model()
        self.agg.add(t, self.options[ti][oi], -1)
        self.agg.add(t, keep)
        cols = self.cols.copy()
        self._apply(cols, ti, self.choice[ti], self.ranks[ti], -1)
        ranks = self._fit(ti, oi, cols, model)
        if ranks is None:
            return None
        self._apply(cols, ti, oi, ranks, 1)
        return float(cols.times(model).max())

    def _take(self, ti: int, oi: int, ranks: list[int] | None = None) -> list[int] | None:
        """Replace table ``ti``'s shards by option ``oi``'s on ``ranks`` (default: placed greedily)."""
        if self.ranks[ti] is not None:
            self._add(ti, self.ranks[ti], -1)
        self._switch(ti, oi)
        self.model = self.agg.model()
        ranks = ranks if ranks is not None else self._fit(ti)
        if ranks is not None:
            self._add(ti, ranks)
        return ranks
