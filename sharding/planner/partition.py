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
   rank's time; then move shards off the fullest rank where no rank gets slower than the slowest;
5. every table tries every other option in place; those results explain the plan.

If shards do not pack into memory, steps 1-3 run again with smaller shards (a smaller share of a
rank per shard), down to 1/W. Each shard's cost comes down to a ``Hot`` (five numbers); per rank the
search keeps their sums in ``Columns`` (``estimate.RankModel.times`` turns them into time).
"""
from __future__ import annotations

import operator
from collections import Counter
from typing import NamedTuple

from sharding.planner.estimate import PieceCost, RankModel, alltoall_seconds_per_byte, piece_cost, requester_bytes
from sharding.planner.types import ShardOption, Topology, Workload, human_bytes
from sharding.sharding_types import ANY, EVERY, LISTED, NODE, RULES
from sharding.types import ShardingType, TableConfig

# A shard slower than this fraction of the mean rank's work is split before placement: one piece
# larger than the mean would make its rank the slowest whatever else goes where.
SPLIT_FRACTION = 1.0
# Largest shard, as a share of an empty rank's free memory, tried in turn until the shards pack.
PIECE_MEMORY_SHARES = (1.0, 0.5, 0.25, 0.125, 0.0625)
LOCAL_SEARCH_CANDIDATES = 4  # the slowest rank's largest shards tried per local-search step
MAX_LOCAL_STEPS_PER_TABLE = 4
MAX_FINAL_PASSES = 3  # passes over all tables trying every other option (they also explain the plan)
# The final passes take another option only for this much less step time (a fraction): smaller gains
# are below what the model can tell apart, and each one makes the tables tried before it be tried again.
FINAL_PASS_MIN_GAIN = 1e-3
EPS_S = 1e-12


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


class Columns:
    """Per-rank sums of the shards' ``Hot`` costs, one list per field (rank r: ``cols.mem[r]``)."""

    __slots__ = Hot._fields

    def __init__(self, world_size: int):
        for name in self.__slots__:
            setattr(self, name, [0.0] * world_size)

    def copy(self) -> "Columns":
        other = Columns(0)
        for name in self.__slots__:
            setattr(other, name, getattr(self, name)[:])
        return other

    def add(self, r: int, h: Hot, sign: float = 1) -> None:
        self.seconds[r] += sign * h.seconds
        self.ids[r] += sign * h.ids
        self.out[r] += sign * h.out
        self.grad[r] += sign * h.grad
        self.mem[r] += sign * h.mem

    def add_columns(self, delta: "Columns", sign: int) -> None:
        """Every rank at once (an option with a shard on every rank)."""
        op = operator.add if sign > 0 else operator.sub
        for name in self.__slots__:
            setattr(self, name, list(map(op, getattr(self, name), getattr(delta, name))))

    def times(self, model: RankModel) -> list[float]:
        return model.times(self.seconds, self.ids, self.out, self.grad)

    def time_with(self, model: RankModel, r: int, h: Hot) -> float:
        """Rank ``r``'s time if it also held ``h``."""
        return model.times([self.seconds[r] + h.seconds], [self.ids[r] + h.ids], [self.out[r] + h.out],
                           [self.grad[r] + h.grad])[0]


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
        self.work_s = [[sum(self.piece_s(c) for c in cs) for cs in per] for per in self.costs]
        self._deltas: dict[tuple[int, int], Columns] = {}  # see _everywhere
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

    # ---- costs ------------------------------------------------------------------------------------
    def _option_costs(self, t: TableConfig, option: ShardOption) -> list[Hot]:
        cache: dict[tuple[int, int], Hot] = {}  # row shards and replicas repeat one shape
        out = []
        for p in option.shards:
            key = (p.num_rows, p.width)
            if key not in cache:
                cache[key] = Hot.of(piece_cost(t, p, option.kind, self.work, self.topo))
            out.append(cache[key])
        return out

    def piece_s(self, h: Hot) -> float:
        return h.seconds + (h.ids + h.out + h.grad) * self.s_per_byte

    def max_piece_mem(self, ti: int, oi: int) -> float:
        return max(h.mem for h in self.costs[ti][oi])

    def max_piece_s(self, ti: int, oi: int) -> float:
        return max(self.piece_s(h) for h in self.costs[ti][oi])

    def free_bytes(self, rank: int) -> float:
        return self.model.free_bytes() - self.cols.mem[rank]

    def times(self) -> list[float]:
        return self.cols.times(self.model)

    def overfull(self) -> list[int]:
        return [r for r in range(self.topo.world_size) if self.free_bytes(r) < 0]

    def feasible(self) -> bool:
        return not (self.too_big or self.unplaced or self.overfull())

    # ---- the stages -------------------------------------------------------------------------------
    def run(self) -> None:
        for share in PIECE_MEMORY_SHARES:
            self.reset()
            self._choose(share)
            self._split_large()
            self._place_all()
            if self.feasible() or self.too_big:
                break
        if self.feasible():
            self._local_search()
            self._spread_memory()
            self.alternatives = self._final_passes()

    def _spread_memory(self) -> None:
        """Move shards off the rank with the most memory onto ranks with less, where that keeps every
        rank below the slowest rank's time: the step time stays, memory headroom grows."""
        for _ in range(MAX_LOCAL_STEPS_PER_TABLE * len(self.tables)):
            mem, worst = self.cols.mem, max(self.times())
            m = max(range(len(mem)), key=mem.__getitem__)
            pieces = sorted(self.on_rank[m], key=lambda x: -self.costs[x[0]][self.choice[x[0]]][x[1]].mem)
            if not any(self._move_for_memory(ti, pi, m, worst) for ti, pi in pieces[:LOCAL_SEARCH_CANDIDATES]):
                break

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
        worst = max(self.times())
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
        placement = self._placement(ti, oi)
        if placement in (LISTED, EVERY):
            return list(option.ranks) if all(free - mem[r] >= h.mem for r, h in zip(option.ranks, costs)) else None
        times = cols.times(model)
        if placement == NODE:
            return self._fit_node(option, costs, times, free, mem)
        if len(costs) == 1:  # most tables: the least loaded rank, if it has room
            r = min(option.ranks, key=times.__getitem__)
            if free - mem[r] >= costs[0].mem:
                return [r]
        order = sorted(option.ranks, key=times.__getitem__)  # stable: ties go to the lower rank
        ranks: list[int] = []
        for h in costs:
            r = next((r for r in order if free - mem[r] >= h.mem and r not in ranks), None)
            if r is None:
                return None
            ranks.append(r)
        return ranks

    def _fit_node(self, option: ShardOption, costs, times: list[float], free: float, mem: list[float]):
        """The node whose slowest rank is least loaded among those with room (template: node 0's ranks)."""
        g, best = self.topo.ranks_per_node, None
        for node in range(self.topo.nodes):
            ranks = [r + node * g for r in option.ranks]
            if all(free - mem[r] >= h.mem for r, h in zip(ranks, costs)):
                load = max(times[r] for r in ranks)
                if best is None or load < best[0]:
                    best = (load, ranks)
        return best[1] if best else None

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
        for r, h in zip(ranks, self.costs[ti][oi]):
            cols.add(r, h, sign)

    def _everywhere(self, ti: int, oi: int) -> Columns:
        """Per-rank columns of an option with a shard on every rank (cached: trials reuse them)."""
        key = (ti, oi)
        if key not in self._deltas:
            delta = Columns(self.topo.world_size)
            for r, h in zip(self.options[ti][oi].ranks, self.costs[ti][oi]):
                delta.add(r, h)
            self._deltas[key] = delta
        return self._deltas[key]

    # ---- local search -----------------------------------------------------------------------------
    def _local_search(self) -> None:
        for _ in range(MAX_LOCAL_STEPS_PER_TABLE * len(self.tables) + self.topo.world_size):
            if not self._improve_once():
                break

    def _improve_once(self) -> bool:
        times = self.times()
        b = max(range(len(times)), key=times.__getitem__)
        pieces = sorted(self.on_rank[b], key=lambda x: -self.piece_s(self.costs[x[0]][self.choice[x[0]]][x[1]]))
        pieces = pieces[:LOCAL_SEARCH_CANDIDATES]
        if any(self._try_move(ti, pi, b, times) for ti, pi in pieces):
            return True
        return any(self._try_other(ti, times[b]) for ti in dict.fromkeys(ti for ti, _ in pieces))

    def _try_move(self, ti: int, pi: int, b: int, times: list[float]) -> bool:
        """Move the shard to the rank where it ends fastest, if that is below the slowest rank now."""
        h, held = self.costs[ti][self.choice[ti]][pi], set(self.ranks[ti])
        free, cols = self.model.free_bytes(), self.cols
        best, best_s = None, times[b] - EPS_S
        for r in self.options[ti][self.choice[ti]].ranks:
            if r in held or free - cols.mem[r] < h.mem:
                continue
            s = cols.time_with(self.model, r, h)
            if s < best_s:
                best, best_s = r, s
        if best is None:
            return False
        self._move(ti, pi, b, best)
        return True

    def _move_for_memory(self, ti: int, pi: int, m: int, worst: float) -> bool:
        h, held, cols = self.costs[ti][self.choice[ti]][pi], set(self.ranks[ti]), self.cols
        best = None
        for r in self.options[ti][self.choice[ti]].ranks:
            if r in held or cols.mem[r] + h.mem >= cols.mem[m] or (best is not None and cols.mem[r] >= cols.mem[best]):
                continue
            if cols.time_with(self.model, r, h) < worst - EPS_S:
                best = r
        if best is None:
            return False
        self._move(ti, pi, m, best)
        return True

    def _move(self, ti: int, pi: int, src: int, dst: int) -> None:
        h = self.costs[ti][self.choice[ti]][pi]
        self.cols.add(src, h, -1)
        self.cols.add(dst, h)
        self.on_rank[src].discard((ti, pi))
        self.on_rank[dst].add((ti, pi))
        self.ranks[ti][pi] = dst

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
        return max(cols.times(model))

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
