"""Dynamic embedding tables: rows keyed by raw int64 ids (any value, negative too), made when an id is
admitted and freed when it is evicted, on the plain-PyTorch path.

    tables = [DynamicTableConfig("user", dim=16, capacity=100_000, admit_count=2, evict="lru")]
    emb = DynamicEmbeddingCollection(tables, rank=dist.get_rank(), seed=0, optim=OptimSpec("adagrad", 0.05))
    pooled = emb(JaggedBatch(["user"], raw_ids, lengths))   # [local batch, 16]
    loss_of(pooled).backward()
    emb.step(global_step)          # touched admitted rows updated, their counts and last-seen step too
    emb.evict(global_step)         # at checkpoint time: steps_to_live / l2 policies free their slots
    emb.stats()                    # {"user": {"admitted": .., "evicted": .., "rejected": .., "occupancy": ..}}

How an id travels: the owner of id x is ``mix64(x) mod world`` (splitmix64's finalizer, fixed, not Python's
``hash``). Each rank sends its bags' ids to their owners (counts first, then lengths and ids, as the sharded
runtime does, ``sharding.comm``); the owner pools the ids it holds (ids not admitted pool as zeros and get
no update) and sends the partial sums back with a differentiable all-to-all; the sample's rank adds them up.
Backward brings each owner its rows' gradients; ``step`` applies ``SparseOptimizer.update_rows`` to them.

A new row's values depend on (seed, table, id) only (``init_rows_for_ids``), so the same id starts the
same on any number of ranks and after resharding.

DeepRec's EmbeddingVariable settings and what they are here:

- ``CounterFilter(filter_freq=N)`` (EV's feature admission): ``admit_count=N``. Occurrences of ids not yet
  admitted are counted in a count-min sketch of fixed size (``SKETCH_DEPTH`` x ``SKETCH_WIDTH`` counters per
  shard): it can only over-count (collisions add other ids' counts), so an id may be admitted early, never
  late. Until admitted an id pools as EV's default value, zeros here.
- ``GlobalStepEvict(steps_to_live=N)``: ``evict="steps_to_live", steps_to_live=N``; ``evict(step)`` (call it
  when saving, as EV evicts at checkpoint time) frees slots last seen more than N steps before ``step``.
- ``L2WeightEvict(l2_weight_threshold=T)``: ``evict="l2", l2_threshold=T``; ``evict(step)`` frees slots whose
  row norm is below T (EV compares the squared norm: pass its threshold's square root).
- EV grows without bound; a shard here holds ``capacity`` rows, and a newly admitted id that finds it full
  takes the least recently ("lru") or least often ("lfu") seen slot, or is rejected and counted ("none",
  "steps_to_live", "l2": those free room only at ``evict``). Slots seen in the current batch are never taken.

An evicted slot's optimizer state is zeroed and its row set to the next id's initial values when it is
reused; a re-seen evicted id starts again from its initial row (its sketch count stays, so it is admitted
again at once).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sharding.comm import AsyncAllToAll, exchange, world_size
from sharding.jagged import JaggedBatch
from sharding.optim import OptimSpec, SparseOptimizer
from sharding.runtime import InputError
from sharding.types import DynamicTableConfig, state_names

SKETCH_DEPTH = 4  # count-min sketch rows (independent hashes); its error shrinks exponentially in this
SKETCH_WIDTH = 1 << 16  # counters per row: 4 x 65536 int32 = 1 MiB per shard with admit_count > 1
NEVER = -(1 << 62)  # last-seen step of a free slot: older than any step
ERR_NONE, ERR_KEYS, ERR_DTYPE, ERR_WEIGHTS = 0, 1, 2, 3
COUNT_FIELDS = 4  # batch size, ids sent, error code, table index
_U24 = float(1 << 24)  # random values take 24 bits: a float32's mantissa


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 ids (wrapping arithmetic): a fixed, well-spread 64-bit hash.

        mix64(torch.tensor([-1, 0, 2**62]))
    """
    x = x ^ _shr(x, 30)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    x = x ^ _shr(x, 27)
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ _shr(x, 31)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift (torch's >> on int64 is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def owner_of(ids: torch.Tensor, world: int) -> torch.Tensor:
    """The rank that holds each id: ``owner_of(torch.tensor([7, -3]), 2)``."""
    return (mix64(ids) & 0x7FFF_FFFF_FFFF_FFFF) % world


def _uniform(ids: torch.Tensor, salt: int, dim: int) -> torch.Tensor:
    """[len(ids), dim] values in [0, 1), a function of (id, salt, column) only."""
    cols = torch.arange(dim, dtype=torch.int64)
    h = mix64(mix64(ids[:, None] ^ salt) + cols)
    return _shr(h, 40).to(torch.float32) / _U24


def init_rows_for_ids(seed: int, table_index: int, ids: torch.Tensor, t: DynamicTableConfig) -> torch.Tensor:
    """The initial rows of ``ids`` [n] in table ``t``: the same on any rank and any number of ranks.

        init_rows_for_ids(0, 0, torch.tensor([5, -9]), DynamicTableConfig("user", 4, 100))   # [2, 4]
    """
    salt = int(mix64(torch.tensor([seed * 1_000_003 + table_index]))[0])
    if t.init == "zeros":
        return torch.zeros(ids.numel(), t.dim)
    if t.init == "uniform":
        return (_uniform(ids, salt, t.dim) * 2 - 1) * t.init_bound
    u1 = (_uniform(ids, salt, t.dim) * _U24 + 1) / (_U24 + 1)  # (0, 1]: log is finite
    u2 = _uniform(ids, salt ^ 0x5BD1E995, t.dim)
    return t.init_std * torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


class CountMinSketch:
    """Occurrence counts of ids in fixed memory; ``add`` returns each id's estimate after adding, which
    is never below its true count (collisions only add). ``sketch.add(torch.tensor([3, 3, -7]))``."""

    def __init__(self, depth: int = SKETCH_DEPTH, width: int = SKETCH_WIDTH):
        self.table = torch.zeros(depth, width, dtype=torch.int32)
        self.salts = [int(mix64(torch.tensor([d + 1]))[0]) for d in range(depth)]

    def add(self, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Add ``counts`` occurrences of distinct ``ids``; their estimates after."""
        width = self.table.shape[1]
        est = []
        for row, salt in zip(self.table, self.salts):  # depth rows, vectorized over ids
            cell = (mix64(ids ^ salt) & 0x7FFF_FFFF_FFFF_FFFF) % width
            row.index_add_(0, cell, counts.to(torch.int32))
            est.append(row[cell])
        return torch.stack(est).min(0).values


class HashShard:
    """One rank's part of a dynamic table: ``capacity`` slots, the id -> slot map as sorted keys searched
    with ``searchsorted`` (vectorized; rebuilt when ids come or go), fp32 rows and per-slot optimizer state.

        shard = HashShard(DynamicTableConfig("user", 4, capacity=8), 0, seed=0, optim=OptimSpec("sgd", 0.1))
        pooled = shard.pool(torch.tensor([5, -9, 5]), torch.tensor([2, 1]), train=True)   # [2, 4]
        pooled.sum().backward(); shard.step(1)
    """

    def __init__(self, t: DynamicTableConfig, table_index: int, seed: int, optim: OptimSpec | None):
        self.t, self.table_index, self.seed = t, table_index, seed
        self.weight = nn.Parameter(torch.zeros(t.capacity, t.dim), requires_grad=False)
        self.slot_id = torch.zeros(t.capacity, dtype=torch.int64)
        self.used = torch.zeros(t.capacity, dtype=torch.bool)
        self.count = torch.zeros(t.capacity, dtype=torch.int64)  # occurrences since admission
        self.last_step = torch.full((t.capacity,), NEVER, dtype=torch.int64)
        self.keys = torch.zeros(0, dtype=torch.int64)  # admitted ids, sorted
        self.key_slot = torch.zeros(0, dtype=torch.int64)  # their slots
        self.sketch = CountMinSketch() if t.admit_count > 1 else None
        self.counters = {"admitted": 0, "evicted": 0, "rejected": 0}
        self.step_seen = 0  # the last global step given to step(): admissions' last-seen step
        self.optimizer = None
        if optim is not None:
            self.optimizer = SparseOptimizer([self.weight], optim.kind, optim.lr, optim.eps, optim.betas, optim.l2)
            self.optimizer.init_state()
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (slots, leaf, occurrences)

    # ---- the map ----------------------------------------------------------------------------------
    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Each id's slot, -1 where it has none."""
        if self.keys.numel() == 0:
            return torch.full_like(ids, -1)
        pos = torch.searchsorted(self.keys, ids).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[pos] == ids, self.key_slot[pos], -1)

    def _rebuild(self) -> None:
        slots = self.used.nonzero().squeeze(1)
        self.keys, order = torch.sort(self.slot_id[slots])
        self.key_slot = slots[order]

    def _state(self) -> dict[str, torch.Tensor]:
        return self.optimizer.state[self.weight] if self.optimizer is not None else {}

    def _free(self, slots: torch.Tensor) -> None:
        """Slots back to free: row and optimizer state zeroed, counted as evicted."""
        self.used[slots] = False
        self.weight.data[slots] = 0.0
        self.count[slots], self.last_step[slots] = 0, NEVER
        for name, v in self._state().items():
            if v.dim() > 0:
                v[slots] = 0.0
        self.counters["evicted"] += int(slots.numel())

    def _place(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """New ids into free ``slots``: their initial rows, zero optimizer state."""
        self.used[slots], self.slot_id[slots] = True, ids
        self.weight.data[slots] = init_rows_for_ids(self.seed, self.table_index, ids, self.t)
        self.count[slots], self.last_step[slots] = 0, self.step_seen
        for name, v in self._state().items():
            if v.dim() > 0:
                v[slots] = 0.0
        self.counters["admitted"] += int(ids.numel())

    # ---- admission and eviction -------------------------------------------------------------------
    def _admit(self, ids: torch.Tensor, pinned: torch.Tensor) -> None:
        """Ids without a slot seen in a training batch: those counted ``admit_count`` times get one."""
        new, occurrences = torch.unique(ids, return_counts=True)
        if self.sketch is not None:
            new = new[self.sketch.add(new, occurrences) >= self.t.admit_count]
        if new.numel() == 0:
            return
        slots = self._room(new.numel(), pinned)
        self.counters["rejected"] += new.numel() - slots.numel()
        self._place(new[:slots.numel()], slots)
        self._rebuild()

    def _room(self, n: int, pinned: torch.Tensor) -> torch.Tensor:
        """Up to ``n`` slots for new ids: free ones first, then (lru, lfu) victims not ``pinned``."""
        free = (~self.used).nonzero().squeeze(1)[:n]
        if free.numel() == n or self.t.evict not in ("lru", "lfu"):
            return free
        candidates = (self.used & ~pinned).nonzero().squeeze(1)
        rank_by = self.last_step if self.t.evict == "lru" else self.count
        # stable: among equals the lower slot goes first, so runs are reproducible
        victims = candidates[torch.argsort(rank_by[candidates], stable=True)][:n - free.numel()]
        self._free(victims)
        return torch.cat([free, victims])

    def evict(self, step: int) -> int:
        """Free the slots the policy retires at ``step`` (steps_to_live, l2; others: none); how many."""
        if self.t.evict == "steps_to_live":
            gone = self.used & (step - self.last_step > self.t.steps_to_live)
        elif self.t.evict == "l2":
            gone = self.used & (self.weight.detach().norm(dim=1) < self.t.l2_threshold)
        else:
            return 0
        slots = gone.nonzero().squeeze(1)
        if slots.numel():
            self._free(slots)
            self._rebuild()
        return int(slots.numel())

    # ---- lookup and update ------------------------------------------------------------------------
    def pool(self, ids: torch.Tensor, lengths: torch.Tensor, train: bool) -> torch.Tensor:
        """Sum-pooled bags [len(lengths), dim] of ``ids``; ids without a row add zeros. ``train``: count
        and admit new ids, and keep the touched rows for ``step``."""
        slots = self.find(ids)
        if train and bool((slots < 0).any()):
            pinned = torch.zeros_like(self.used)
            pinned[slots[slots >= 0]] = True  # this batch's rows, and those of forwards not yet stepped
            for held, _, _ in self.pending:
                pinned[held] = True
            self._admit(ids[slots < 0], pinned)
            slots = self.find(ids)
        found = slots >= 0
        rows, local = torch.unique(slots[found], return_inverse=True)
        leaf = self.weight.detach().index_select(0, rows).requires_grad_(train and torch.is_grad_enabled())
        if leaf.requires_grad:
            self.pending.append((rows, leaf, torch.bincount(local, minlength=rows.numel())))
        bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)[found]
        kept = torch.bincount(bag, minlength=lengths.numel())
        return F.embedding_bag(local, leaf, torch.cumsum(kept, 0) - kept, mode="sum")

    def step(self, global_step: int) -> None:
        """The optimizer on the rows the pending forwards touched (each once, by its summed gradient),
        and their counts and last-seen step."""
        self.step_seen = int(global_step)
        for rows, leaf, occurrences in self.pending:
            self.count[rows] += occurrences
            self.last_step[rows] = self.step_seen
        if self.optimizer is not None:
            rows, grads = self._summed_grads()
            self.optimizer.update_rows(self.weight, rows, grads)  # also with no rows: Adam's step counts
        self.pending.clear()

    def _summed_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        with_grad = [(rows, leaf.grad) for rows, leaf, _ in self.pending if leaf.grad is not None]
        if len(with_grad) == 1:
            return with_grad[0]
        rows = torch.cat([r for r, _ in with_grad]) if with_grad else torch.zeros(0, dtype=torch.int64)
        grads = torch.cat([g for _, g in with_grad]) if with_grad else torch.zeros(0, self.t.dim)
        distinct, inverse = torch.unique(rows, return_inverse=True)
        return distinct, grads.new_zeros(distinct.numel(), self.t.dim).index_add_(0, inverse, grads)

    def discard(self) -> None:
        """Forget this step's touched rows: the next ``step`` updates nothing they would have."""
        self.pending.clear()

    def stats(self) -> dict[str, int]:
        return {**self.counters, "occupancy": int(self.used.sum()), "capacity": self.t.capacity}

    # ---- state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        """(ids, rows, optimizer state, counts, last step) of the admitted ids, sorted by id; copies."""
        slots = self.key_slot
        per_slot = {k: v[slots].clone() for k, v in self._state().items() if v.dim() > 0}
        scalars = {k: v.clone() for k, v in self._state().items() if v.dim() == 0}
        return {"ids": self.keys.clone(), "rows": self.weight.detach()[slots].clone(), "optim": per_slot,
                "optim_scalars": scalars, "counts": self.count[slots].clone(),
                "last_step": self.last_step[slots].clone(), "counters": dict(self.counters),
                "step_seen": self.step_seen}

    def load(self, states: list[dict], keep) -> None:
        """Replace the contents by the ids ``keep(ids)`` selects from ``states`` (any shards' ``state()``).
        The admission sketch starts empty: ids not yet admitted count again from zero."""
        picked = [{k: _pick(v, keep(s["ids"])) for k, v in s.items()} for s in states]
        ids = torch.cat([p["ids"] for p in picked])
        if ids.numel() > self.t.capacity:
            raise ValueError(f"dynamic table {self.t.name}: {ids.numel()} ids to load, capacity {self.t.capacity}")
        self.used[:], self.pending = False, []
        slots = torch.arange(ids.numel())
        self.used[slots], self.slot_id[slots] = True, ids
        self.weight.data.zero_()[slots] = torch.cat([p["rows"] for p in picked])
        self.count[slots] = torch.cat([p["counts"] for p in picked])
        self.last_step.fill_(NEVER)[slots] = torch.cat([p["last_step"] for p in picked])
        for name, v in self._state().items():
            if v.dim() > 0:
                v.zero_()[slots] = torch.cat([p["optim"][name] for p in picked])
            else:  # Adam's step count: the same on every rank (each steps every step)
                v.copy_(max(s["optim_scalars"][name] for s in states))
        self.step_seen = max(s["step_seen"] for s in states)
        self._rebuild()


def _pick(v, mask: torch.Tensor):
    """A state entry's values at ``mask`` (per-id tensors and dicts of them); others as they are."""
    if isinstance(v, torch.Tensor):
        return v[mask]
    if isinstance(v, dict) and all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in v.values()):
        return {k: x[mask] for k, x in v.items()}
    return v


class DynamicEmbeddingCollection(nn.Module):
    """Dynamic tables across the ranks of ``group`` (see the module docstring); pooled columns in table
    order. ``emb = DynamicEmbeddingCollection(tables, rank=0, group=None, seed=0, optim=OptimSpec("sgd", 0.1))``
    """

    def __init__(self, tables: list[DynamicTableConfig], rank: int = 0, group=None, seed: int = 0,
                 optim: OptimSpec | None = None):
        super().__init__()
        self.tables, self.rank, self.group, self.world = list(tables), rank, group, world_size(group)
        self.names, self.dims = [t.name for t in tables], [t.dim for t in tables]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"dynamic tables: duplicate names in {self.names}")
        self.shards = [HashShard(t, i, seed, optim) for i, t in enumerate(tables)]

    # ---- input dist -------------------------------------------------------------------------------
    def _check(self, sparse: JaggedBatch) -> tuple[int, int]:
        if sparse.keys != self.names:
            return ERR_KEYS, 0
        if sparse.values.dtype != torch.int64:  # the first table with ids is the one named
            return ERR_DTYPE, next((i for i, n in enumerate(sparse.length_per_key()) if n), 0)
        if sparse.weights is not None:  # not pooled yet: refused rather than silently ignored
            return ERR_WEIGHTS, 0
        return ERR_NONE, 0

    def _raise(self, counts: torch.Tensor, sparse: JaggedBatch) -> None:
        """Bad input on any rank, raised on every rank (all saw the same counts)."""
        for src in range(self.world):
            code = int(counts[src, 2])
            if code == ERR_KEYS:
                raise InputError(f"rank {src}: batch feature keys do not match the dynamic tables {self.names}")
            if code == ERR_DTYPE:
                raise InputError(f"rank {src}: dynamic table {self.names[int(counts[src, 3])]}: ids must be "
                                 f"int64 (raw ids), got {sparse.values.dtype if src == self.rank else 'another dtype'}")
            if code == ERR_WEIGHTS:
                raise InputError(f"rank {src}: dynamic tables {self.names}: per-sample weights are not supported yet")

    def _bucketize(self, sparse: JaggedBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per owner: lengths [tables * batch] of the ids it gets, and those ids (table-major, then bag)."""
        n_t, batch = len(self.tables), sparse.batch_size
        bag = torch.repeat_interleave(torch.arange(n_t * batch), sparse.lengths)  # table * batch + sample
        key = owner_of(sparse.values, self.world) * (n_t * batch) + bag
        order = torch.argsort(key, stable=True)
        lengths = torch.bincount(key, minlength=self.world * n_t * batch).view(self.world, n_t * batch)
        return lengths, list(torch.split(sparse.values[order], lengths.sum(1).tolist()))

    def _send_ids(self, sparse: JaggedBatch):
        """Counts, then (lengths, ids) to every owner; what arrived: [(batch size, lengths, ids)] per source."""
        err = self._check(sparse)
        if err[0] == ERR_NONE:
            lengths, ids = self._bucketize(sparse)
        else:  # nothing is sent: every rank raises after the counts
            lengths, ids = torch.zeros(self.world, 0, dtype=torch.int64), [torch.zeros(0, dtype=torch.int64)] * self.world
        rows = [[sparse.batch_size, int(v.numel()), *err] for v in ids]
        counts = exchange(torch.tensor(rows, dtype=torch.int64).reshape(-1), [COUNT_FIELDS] * self.world,
                          [COUNT_FIELDS] * self.world, self.group).view(self.world, COUNT_FIELDS)
        self._raise(counts, sparse)
        payload = [torch.cat([lens, v]) for lens, v in zip(lengths, ids)]
        n_t = len(self.tables)
        recv = [n_t * int(b) + int(n) for b, n in counts[:, :2].tolist()]
        got = torch.split(exchange(torch.cat(payload), [p.numel() for p in payload], recv, self.group), recv)
        return [(int(b), g[:n_t * int(b)], g[n_t * int(b):]) for (b, _), g in zip(counts[:, :2].tolist(), got)]

    def _per_table(self, arrived) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The arrived bags regrouped per table: (ids, lengths), bags by (source, sample)."""
        n_t = len(self.tables)
        lengths = torch.cat([lens.view(n_t, b) for b, lens, _ in arrived], dim=1)  # [tables, all samples]
        # ids came source-major, table next: each table's ids, by source
        per_source = [torch.split(v, lens.view(n_t, b).sum(1).tolist()) for b, lens, v in arrived]
        return [(torch.cat([p[t] for p in per_source]), lengths[t]) for t in range(n_t)]

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, sparse: JaggedBatch) -> torch.Tensor:
        """Pooled [local batch, sum of dims]: ``emb(JaggedBatch(["user"], ids, lengths))``."""
        arrived = self._send_ids(sparse)
        batch_sizes = [b for b, _, _ in arrived]
        train = self.training
        pooled = torch.cat([shard.pool(ids, lengths, train)
                            for shard, (ids, lengths) in zip(self.shards, self._per_table(arrived))], dim=1)
        width, batch = sum(self.dims), sparse.batch_size
        flight = AsyncAllToAll(pooled.reshape(-1), [b * width for b in batch_sizes],
                               [batch * width] * self.world, self.group)
        out = flight.wait().view(self.world, batch, width).sum(0)  # owners' partial sums (others' are 0)
        return out / self._mean_divisor(sparse) if any(t.pooling == "mean" for t in self.tables) else out

    def _mean_divisor(self, sparse: JaggedBatch) -> torch.Tensor:
        lengths = sparse.lengths.view(len(self.tables), -1).t().clamp(min=1).to(torch.float32)
        mean = torch.tensor([t.pooling == "mean" for t in self.tables])
        return torch.where(mean, lengths, torch.ones_like(lengths)).repeat_interleave(torch.tensor(self.dims), dim=1)

    # ---- updates, eviction, state -----------------------------------------------------------------
    def step(self, global_step: int) -> None:
        """Update the rows this rank's shards gave to the last forwards; counts and last-seen to ``global_step``."""
        for shard in self.shards:
            shard.step(global_step)

    def discard(self) -> None:
        for shard in self.shards:
            shard.discard()

    def evict(self, global_step: int) -> dict[str, int]:
        """Each table's slots freed at ``global_step`` by its policy (steps_to_live, l2): ``emb.evict(1000)``."""
        return {t.name: shard.evict(global_step) for t, shard in zip(self.tables, self.shards)}

    def stats(self) -> dict[str, dict[str, int]]:
        """This rank's counters per table: admitted, evicted, rejected (no room), occupancy, capacity."""
        return {t.name: shard.stats() for t, shard in zip(self.tables, self.shards)}

    def state(self) -> dict[str, dict]:
        """This rank's part of every table (``HashShard.state``), by table name."""
        return {t.name: shard.state() for t, shard in zip(self.tables, self.shards)}

    def load_state(self, states: list[dict[str, dict]]) -> None:
        """Load from the ``state()`` of every rank of a run with any number of ranks: this rank keeps the
        ids it owns now (re-hashed), so ``emb.load_state([state_of_rank0, state_of_rank1])`` reshards 2 -> N."""
        for t, shard in zip(self.tables, self.shards):
            shard.load([s[t.name] for s in states], lambda ids: owner_of(ids, self.world) == self.rank)
