"""The sharded embedding runtime: executes a plan for a collection of embedding-bag tables across ranks.

    emb = ShardedEmbeddingCollection(tables, plan, rank=dist.get_rank(), seed=0,
                                     optim=OptimSpec("adagrad", lr=0.05), kernel="auto")
    pooled = emb(jagged_batch)            # [local batch, sum of dims], tables in order
    # or, to run other work while the pooled vectors (and in backward their gradients) are exchanged:
    flight = emb.start_forward(jagged_batch); bottom = bottom_mlp(dense); pooled = flight.wait()
    loss_of(pooled).backward()
    emb.sync_replica_grads()              # data-parallel tables: all-reduce their gradients
    emb.step()                            # rows not already updated inside backward

Every sharding type is a set of shards (rank, row range, column range), and one forward is the same three
steps for all of them:

1. input dist: each feature's bags are cut per shard (row-wise: the ids in the shard's row range, shifted
   to shard-local rows; table- and column-wise: the whole bag) and sent to the shard's rank; counts go
   first, then lengths and ids in one ``all_to_all_single``, then per-sample weights if any;
2. local lookup: the owner pools every received bag of all its shards in one call (``sharding.lookup``:
   a table-batched kernel (distrec's CPU or Triton kernels, fbgemm's op), or ``embedding_bag`` once per
   shard width; not a loop over tables);
3. output dist: pooled vectors go back to the ranks that own the samples (differentiable all-to-all)
   and are added into the output columns: column shards land side by side, row-wise partial sums add up.

A plan with the two-level exchange sends the pooled rows back within each node first, its row-wise
partial sums added there, then once between nodes (``sharding.two_level``); the results are the same.

Both exchanges are started and waited on apart: data-parallel tables are looked up while the ids fly,
and ``start_forward`` returns with the pooled vectors in flight (``OutputDist``), so the caller's work in
between (the DLRM's bottom MLP) hides their exchange, and in backward the exchange of their gradients.

Data-parallel tables are replicas looked up locally; ``sync_replica_grads`` all-reduces their gradients.
Gradients of sharded rows come back through the reversed all-to-all to the owner, where a table-batched
kernel updates the touched rows inside backward, or the plain path leaves row-sparse gradients for ``step()``
(``sharding.optim``); no dense gradient the size of a table is ever made.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass

import torch
from torch import nn

from sharding.comm import AsyncAllToAll, Exchange, all_reduce_, exchange, start_exchange, world_size
from sharding.jagged import JaggedBatch
from sharding.lookup import Placed, TorchLookup, choose_kernel, make_lookup
from sharding.optim import OptimSpec
from sharding.plan import validate_plan
from sharding.rounding import DTYPES
from sharding.two_level import TwoLevelOutput, assemble
from sharding.types import PRECISIONS, PlanError, Shard, ShardingPlan, ShardingType, TableConfig

ERR_NONE, ERR_KEYS, ERR_RANGE = 0, 1, 2
COUNT_FIELDS = 6  # batch size, ids sent, has weights, error code, feature index, bad id
# A batch's origin (JaggedBatch.origin) is sent to every rank only when some rank has bad input, so the
# error names where the bad rows came from on every rank; a longer text keeps its end (file, row group).
ORIGIN_BYTES = 1024


@dataclass
class InputDist:
    """A batch whose ids are on their way to their shards' owners (see ``start_input_dist``)."""

    sparse: JaggedBatch
    batch_sizes: list[int]
    id_counts: list[int]
    payload: torch.Tensor
    work: object  # the all-to-all to wait on, or None
    weights: torch.Tensor | None
    weights_work: object
    wait_s: float = 0.0  # how long forward waited for the exchange: ~0 when it was hidden
    started: float = 0.0  # perf_counter() when it was started: its time in flight runs from here

    @property
    def batch_size(self) -> int:
        return self.sparse.batch_size


class OutputDist:
    """A forward whose pooled vectors are on their way back to their samples' ranks (see
    ``ShardedEmbeddingCollection.start_forward``); ``wait()`` once for the pooled [batch, sum of dims]."""

    def __init__(self, emb: "ShardedEmbeddingCollection", flight: AsyncAllToAll | None, replicas: torch.Tensor,
                 sparse: JaggedBatch, done: torch.Tensor | None = None):
        # ``done``: the pooled result when the exchange already completed (the two-level one is blocking)
        self.emb, self.flight, self.replicas, self.sparse, self.done = emb, flight, replicas, sparse, done

    def wait(self) -> torch.Tensor:
        if self.done is not None:
            return self.done
        with torch.profiler.record_function("output_a2a_wait"):
            received = self.flight.wait()
        return self.emb._finish(received, self.replicas, self.sparse)


class InputError(ValueError):
    """Bad input seen by some rank; raised on every rank so that none is left waiting in a collective."""


class ShardedEmbeddingCollection(nn.Module):
    """See the module docstring. Precision: each table's weights are stored as ``TableConfig.precision``
    (replicas of data-parallel tables in fp32: they are small, and their gradients are summed over ranks
    as fp32 rows), updates rounded stochastically unless ``stochastic_rounding`` is false
    (``sharding.rounding``; ``set_salt(step)`` each step keeps runs reproducible); ``comm_precision``
    (forward, backward) is what the pooled vectors and their gradients travel as. ``defer_updates`` (fp16
    loss scaling): backward updates nothing; ``grads()`` are what ``step()`` will apply, or ``discard()``
    drops."""

    def __init__(self, tables: list[TableConfig], plan: ShardingPlan, rank: int = 0, group=None, seed: int = 0,
                 device: torch.device | str = "cpu", optim: OptimSpec | None = None, kernel: str = "auto",
                 timer=None, ranks_per_node: int | None = None, stochastic_rounding: bool = True,
                 comm_precision: tuple[str, str] = ("fp32", "fp32"), defer_updates: bool = False):
        super().__init__()
        self.world = world_size(group)
        validate_plan(plan, tables, self.world)
        bad = [x for x in comm_precision if x not in PRECISIONS]
        if bad:
            raise ValueError(f"unknown exchange precision {bad[0]!r}; expected one of {', '.join(PRECISIONS)}")
        self.comm_dtypes = tuple(DTYPES[x] for x in comm_precision)
        self.tables, self.rank, self.group = list(tables), rank, group
        self.names = [t.name for t in tables]
        self.dims = [t.dim for t in tables]
        kinds = [plan.tables[t.name].sharding_type for t in tables]
        # Per destination rank, its shards in one canonical order every rank agrees on.
        self.dst_shards = [[Placed(i, s)
                            for i, t in enumerate(tables) if kinds[i] != ShardingType.DATA_PARALLEL
                            for s in plan.tables[t.name].shards if s.rank == d] for d in range(self.world)]
        shapes = [(p.shard.num_rows, p.shard.width) for shards in self.dst_shards for p in shards]
        # Decided from the whole plan, so every rank runs the same kernel.
        precisions = {tables[p.table].precision for shards in self.dst_shards for p in shards}
        self.kernel, self.kernel_reason = choose_kernel(kernel, shapes, optim, torch.device(device),
                                                        precisions, defer_updates, stochastic_rounding)
        self.local = make_lookup(self.dst_shards[rank], tables, seed, optim, self.kernel, torch.device(device),
                                 stochastic_rounding, defer_updates)
        self.replicated = [i for i, k in enumerate(kinds) if k == ShardingType.DATA_PARALLEL]
        self.replicas = TorchLookup([Placed(i, plan.tables[tables[i].name].shards[0]) for i in self.replicated],
                                    [dataclasses.replace(t, precision="fp32") for t in tables], seed, optim,
                                    device=device)
        self.optim = optim
        self.recv_width = [sum(p.shard.width for p in shards) for shards in self.dst_shards]
        self.has_mean = any(t.pooling == "mean" for t in tables)
        # Pure row-wise over all ranks (or table-wise on one): rank d's block of pooled columns is already
        # the output layout, so combining them is a sum.
        full = [(i, 0, dim) for i, dim in enumerate(self.dims)]
        self._blocks_in_table_order = not self.replicated and all(
            [(p.table, p.shard.col_start, p.shard.width) for p in shards] == full for shards in self.dst_shards)
        self._routing()
        self.two_level = self._two_level(plan, ranks_per_node)
        self.timer = timer  # an optional phase timer (distrec.trainer.phases.PhaseTimer) for the step-time breakdown
        self.to(device)

    def _two_level(self, plan: ShardingPlan, ranks_per_node: int | None) -> TwoLevelOutput | None:
        """The plan's two-level output exchange (``ranks_per_node`` overrides the plan's node size, e.g.
        torchrun's LOCAL_WORLD_SIZE; any grouping gives the same results), or None for the flat one."""
        if plan.exchange != "two_level":
            return None
        if self.comm_dtypes != (torch.float32, torch.float32):
            raise PlanError("plan.comm_precision applies to the flat output exchange; this plan's two-level "
                             "one sends fp32: set plan.comm_precision = \"fp32\" or plan a flat exchange")
        return TwoLevelOutput(self.dst_shards, self.dims, self.rank, self.world,
                              ranks_per_node or plan.ranks_per_node, self.group)

    def _with_replicas(self, pieces: list, replicas: torch.Tensor) -> list:
        for i, piece in zip(self.replicated, torch.split(replicas, [self.dims[i] for i in self.replicated], 1)):
            pieces[i].append((0, piece))
        return pieces

    # ---- input dist -------------------------------------------------------------------------------
    def _check(self, sparse: JaggedBatch) -> tuple[int, int, int]:
        if sparse.keys != self.names:
            return ERR_KEYS, 0, 0
        bad = sparse.first_out_of_range([t.num_rows for t in self.tables])
        return (ERR_RANGE, *bad) if bad else (ERR_NONE, 0, 0)

    def _routing(self) -> None:
        """Tables and row ranges as one id space: a sorted search finds every id's row shard in one
        pass. Shards holding all rows of their table (table- and column-wise) get the table's bags whole,
        with no search or sort: they are already grouped by table and sample."""
        placed = [p for shards in self.dst_shards for p in shards]
        base = [sum(t.num_rows for t in self.tables[:i]) for i in range(len(self.tables))]
        self._whole = [p.shard.num_rows == self.tables[p.table].num_rows for p in placed]
        routed = [c for c, p in enumerate(placed) if not self._whole[c]]
        routed.sort(key=lambda c: base[placed[c].table] + placed[c].shard.row_start)
        self._base = torch.tensor(base, dtype=torch.int64)
        self._starts = torch.tensor([base[placed[c].table] + placed[c].shard.row_start for c in routed],
                                    dtype=torch.int64)
        self._canon = torch.tensor(routed, dtype=torch.int64)
        self._shift = torch.tensor([placed[c].shard.row_start for c in routed], dtype=torch.int64)
        routed_table = torch.zeros(len(self.tables), dtype=torch.bool)
        routed_table[[placed[c].table for c in routed]] = True
        self._routed_table = routed_table
        self._placed = placed

    def _bucketize(self, sparse: JaggedBatch):
        """Per destination rank: (lengths, ids, weights) of every bag of its shards, in canonical order."""
        batch = sparse.batch_size
        lengths = sparse.lengths.view(len(self.tables), batch)
        counts, local_ids, local_w = self._route(sparse, lengths) if len(self._canon) else (None, None, None)
        per_key = torch.split(sparse.values, sparse.length_per_key())
        per_key_w = torch.split(sparse.weights, sparse.length_per_key()) if sparse.weights is not None else None
        out, c = [], 0
        for shards in self.dst_shards:
            lens, vals, wts = [], [], []
            for p in shards:
                if not self._whole[c]:  # a row shard: its routed ids
                    lens.append(counts[c]), vals.append(local_ids[c]), wts.append(local_w[c])
                else:  # a table or column shard gets every bag of its table whole
                    lens.append(lengths[p.table]), vals.append(per_key[p.table])
                    wts.append(per_key_w[p.table] if per_key_w is not None else None)
                c += 1
            out.append((lens, vals, wts))
        return out

    def _route(self, sparse: JaggedBatch, lengths: torch.Tensor):
        """Row shards' bags: (lengths [shards, batch], ids, weights) per shard in canonical order, each id
        shifted to its shard's rows; entries for other shards are empty."""
        batch, n = sparse.batch_size, len(self._placed)
        table_of_id = torch.repeat_interleave(torch.arange(len(self.tables)), lengths.sum(1))
        bag_of_id = torch.repeat_interleave(torch.arange(batch).repeat(len(self.tables)), sparse.lengths)
        routed = self._routed_table[table_of_id]
        ids = sparse.values[routed]
        k = torch.searchsorted(self._starts, ids + self._base[table_of_id[routed]], right=True) - 1
        key = self._canon[k] * batch + bag_of_id[routed]
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=n * batch).view(n, batch)
        local_ids = torch.split((ids - self._shift[k])[order], counts.sum(1).tolist())
        weights = sparse.weights[routed][order] if sparse.weights is not None else None
        local_w = torch.split(weights, counts.sum(1).tolist()) if weights is not None else [None] * n
        return counts, local_ids, local_w

    def _exchange_counts(self, sparse: JaggedBatch, buckets) -> torch.Tensor:
        err = self._check(sparse)
        rows = [[sparse.batch_size, sum(int(v.numel()) for v in ids), int(sparse.weights is not None), *err]
                for _, ids, _ in buckets]
        send = torch.tensor(rows, dtype=torch.int64).reshape(-1)
        got = exchange(send, [COUNT_FIELDS] * self.world, [COUNT_FIELDS] * self.world, self.group)
        return got.view(self.world, COUNT_FIELDS)

    def _exchange_origins(self, origin: str) -> list[str]:
        """Every rank's batch origin. A collective: call it on every rank or none (all ranks decide from
        the same exchanged counts, so none is left waiting)."""
        raw = origin.encode()[-ORIGIN_BYTES:].ljust(ORIGIN_BYTES, b"\0")
        send = torch.frombuffer(bytearray(raw * self.world), dtype=torch.uint8)
        got = exchange(send, [ORIGIN_BYTES] * self.world, [ORIGIN_BYTES] * self.world, self.group)
        return [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in got.view(self.world, -1)]

    def _raise_input_errors(self, counts: torch.Tensor, origin: str) -> None:
        if not counts[:, 3].any():
            return
        origins = self._exchange_origins(origin)
        for src in range(self.world):
            code, feature, bad = (int(x) for x in counts[src, 3:])
            if code == ERR_KEYS:
                raise InputError(f"rank {src}: batch feature keys do not match the plan's tables {self.names}")
            if code == ERR_RANGE:
                t = self.tables[feature]
                where = f" in {origins[src]}" if origins[src] else ""
                raise InputError(f"rank {src}: feature {t.name}: id {bad} is out of range for table {t.name} "
                                 f"with {t.num_rows} rows{where}")

    def start_input_dist(self, sparse) -> InputDist:
        """Send every bag to its shard's owner without waiting for it to arrive: the counts go first
        (and bad input is raised on every rank), the ids and weights are left in flight, so a trainer
        can run another batch's dense work meanwhile. ``forward`` takes the result."""
        if not isinstance(sparse, JaggedBatch):
            sparse = JaggedBatch.from_kjt(sparse)
        buckets = self._bucketize(sparse) if sparse.keys == self.names else [([], [], [])] * self.world
        counts = self._exchange_counts(sparse, buckets)
        self._raise_input_errors(counts, sparse.origin)
        batch_sizes, id_counts = counts[:, 0].tolist(), counts[:, 1].tolist()
        mine = len(self.dst_shards[self.rank])
        payload = [torch.cat([*lens, *ids]) if lens else torch.zeros(0, dtype=torch.int64) for lens, ids, _ in buckets]
        recv = [mine * b + n for b, n in zip(batch_sizes, id_counts)]
        got, work = start_exchange(torch.cat(payload), [p.numel() for p in payload], recv, self.group)
        weights, weights_work = None, None
        if counts[:, 2].any():  # some rank has weights: all send them, 1.0 where a rank has none
            wsend = [torch.cat([w if w is not None else torch.ones(v.numel()) for v, w in zip(ids, wts)])
                     if ids else torch.zeros(0) for _, ids, wts in buckets]
            weights, weights_work = start_exchange(torch.cat(wsend), [w.numel() for w in wsend], id_counts, self.group)
        return InputDist(sparse, batch_sizes, id_counts, got, work, weights, weights_work, started=time.perf_counter())

    def _arrived(self, inc: InputDist):
        """Wait for the ids; (lengths, ids, weights) of the received bags in (source, shard, sample) order."""
        start = time.perf_counter()
        for work in (inc.work, inc.weights_work):
            if work is not None:
                work.wait()
        end = time.perf_counter()
        inc.wait_s = end - start
        if self.timer is not None:
            self.timer.exchange("input_a2a", end - inc.started, inc.wait_s)
        mine = len(self.dst_shards[self.rank])
        got = torch.split(inc.payload, [mine * b + n for b, n in zip(inc.batch_sizes, inc.id_counts)])
        lengths = torch.cat([g[:mine * b] for g, b in zip(got, inc.batch_sizes)])
        values = torch.cat([g[mine * b:] for g, b in zip(got, inc.batch_sizes)])
        return lengths, values, inc.weights

    # ---- output dist ------------------------------------------------------------------------------
    def _combine(self, received: torch.Tensor, replicas: torch.Tensor, batch: int) -> torch.Tensor:
        """[batch, sum(dims)] from the pooled pieces: a table's column shards side by side in column
        order, its row shards' partial sums added, its replica as looked up here."""
        blocks = torch.split(received, [batch * w for w in self.recv_width])
        if self._blocks_in_table_order:  # every rank sent all tables' columns in order: just add them up
            views = [block.view(batch, width) for block, width in zip(blocks, self.recv_width)]
            return functools.reduce(torch.add, views)  # not sum(): its 0 + first block copies a whole block
        pieces: list[list[tuple[int, torch.Tensor]]] = [[] for _ in self.tables]
        # split, not slicing: each slice's backward would build a zero gradient of the whole block
        for shards, block, width in zip(self.dst_shards, blocks, self.recv_width):
            for p, piece in zip(shards, torch.split(block.view(batch, width), [p.shard.width for p in shards], 1)):
                pieces[p.table].append((p.shard.col_start, piece))
        for i, piece in zip(self.replicated, torch.split(replicas, [self.dims[i] for i in self.replicated], 1)):
            pieces[i].append((0, piece))
        out = []
        for t, table_pieces in enumerate(pieces):
            by_col: dict[int, torch.Tensor] = {}
            for col, piece in table_pieces:  # row-wise shards share a column range: their sums add up
                by_col[col] = by_col[col] + piece if col in by_col else piece
            out.append(torch.cat([by_col[c] for c in sorted(by_col)], dim=1) if len(by_col) > 1 else by_col[0])
        return torch.cat(out, dim=1)

    def _replica_lookup(self, sparse: JaggedBatch) -> torch.Tensor:
        batch = sparse.batch_size
        if not self.replicated:
            return torch.zeros(batch, 0, device=sparse.values.device)
        lengths = sparse.lengths.view(len(self.tables), batch)
        per_key = torch.split(sparse.values, sparse.length_per_key())
        weights = torch.split(sparse.weights, sparse.length_per_key()) if sparse.weights is not None else None
        w = torch.cat([weights[i] for i in self.replicated]) if weights is not None else None
        ids = torch.cat([per_key[i] for i in self.replicated])
        return self.replicas.pool(lengths[self.replicated].reshape(-1), ids, w, [batch])

    def _mean_divisor(self, sparse: JaggedBatch) -> torch.Tensor:
        lengths = sparse.lengths.view(len(self.tables), -1).t().clamp(min=1).to(torch.float32)
        ones = torch.ones_like(lengths)
        per_table = torch.where(torch.tensor([t.pooling == "mean" for t in self.tables]), lengths, ones)
        return per_table.repeat_interleave(torch.tensor(self.dims), dim=1)

    def _phase(self, name: str):
        """Timed for the step-time breakdown when a timer is set; a label in torch.profiler traces always."""
        label = torch.profiler.record_function(name)
        if self.timer is None:
            return label
        stack = contextlib.ExitStack()
        stack.enter_context(label)
        stack.enter_context(self.timer.phase(name))
        return stack

    def forward(self, sparse) -> torch.Tensor:
        """``sparse``: a JaggedBatch, torchrec's KeyedJaggedTensor (keys in table order), or the
        InputDist of one already started. The same as ``start_forward(sparse).wait()``."""
        return self.start_forward(sparse).wait()

    def start_forward(self, sparse) -> "OutputDist":
        """Input dist, local lookup, and the output all-to-all started: ``wait()`` on the result gives
        the pooled [batch, sum of dims]. Work done before that wait (and its backward, before the
        gradients' wait) runs while the pooled vectors (and their gradients) are exchanged.

            flight = emb.start_forward(batch.sparse); bottom = model.bottom(batch.dense); pooled = flight.wait()
        """
        with self._phase("input_a2a"):
            inc = sparse if isinstance(sparse, InputDist) else self.start_input_dist(sparse)
        replicas = self._replica_lookup(inc.sparse)  # local: while the ids fly
        with self._phase("input_a2a"):
            arrived = self._arrived(inc)
        with self._phase("lookup"):
            pooled = self.local.pool(*arrived, inc.batch_sizes)  # [samples of all sources, my width]
        if self.two_level is not None:  # sharding.two_level: summed within each node, then between nodes
            with self._phase("output_a2a"):
                pieces = self.two_level(pooled, inc.batch_sizes, inc.batch_size)
            out = assemble(self._with_replicas(pieces, replicas), inc.batch_size)
            return OutputDist(self, None, replicas, inc.sparse,
                              done=out / self._mean_divisor(inc.sparse) if self.has_mean else out)
        w_mine = self.recv_width[self.rank]
        flight = AsyncAllToAll(pooled.reshape(-1), [b * w_mine for b in inc.batch_sizes],
                               [inc.batch_size * w for w in self.recv_width], self.group,
                               report=self._exchanged if self.timer is not None else None, dtypes=self.comm_dtypes)
        return OutputDist(self, flight, replicas, inc.sparse)

    def _exchanged(self, name: str, ex: Exchange) -> None:
        """An all-to-all of pooled vectors (forward) or their gradients (backward) has arrived: its
        exposed time (start and wait) is phase ``name``, and its overlap is recorded."""
        self.timer.add(name, ex.call_s + ex.waited_s)
        self.timer.exchange(name, ex.flight_s, ex.waited_s)

    def _finish(self, received: torch.Tensor, replicas: torch.Tensor, sparse: JaggedBatch) -> torch.Tensor:
        out = self._combine(received, replicas, sparse.batch_size)
        return out / self._mean_divisor(sparse) if self.has_mean else out

    # ---- gradients of replicas --------------------------------------------------------------------
    def sync_replica_grads(self) -> None:
        """Sum data-parallel tables' gradients over ranks, keeping the rows any rank touched (so lazy
        optimizers see the same rows as with one rank). Call after backward, before the optimizer."""
        if self.world == 1:
            return
        with self._phase("replica_allreduce"):
            self._sync_replica_grads()

    def _sync_replica_grads(self) -> None:
        for p in self.replicas.weights:
            if p.grad is None:
                continue  # every rank looks up every replica each step, so all ranks agree on this
            g = p.grad.coalesce()
            dense = torch.zeros(p.shape[0], p.shape[1] + 1, dtype=p.dtype, device=p.device)
            dense[g.indices()[0], :-1] = g.values()
            dense[g.indices()[0], -1] = 1.0
            all_reduce_(dense, self.group)
            rows = torch.nonzero(dense[:, -1]).reshape(-1)
            # Rows from nonzero() are in range, sorted and distinct: the invariants hold by construction, so
            # say so (torch warns on every rank when the check is left implicit).
            p.grad = torch.sparse_coo_tensor(rows[None], dense[rows, :-1], p.shape, check_invariants=False,
                                             is_coalesced=True)

    def set_lr(self, lr: float) -> None:
        """The sparse learning rate from the next step on, for shards and replicas (a schedule's)."""
        if self.optim is None:
            raise ValueError("set_lr on an embedding collection built without optim (forward only)")
        self.local.set_lr(lr)
        self.replicas.set_lr(lr)
        self.optim = dataclasses.replace(self.optim, lr=lr)

    def set_salt(self, salt: int) -> None:
        """The stochastic rounding's salt of this step's updates (the trainer passes the step number)."""
        self.local.set_salt(salt)
        self.replicas.set_salt(salt)

    def step(self) -> None:
        """Apply the sparse optimizer where backward has not already (torch kernel, replicas, and every
        kernel with ``defer_updates``)."""
        self.local.step()
        self.replicas.step()

    def grads(self) -> list[torch.Tensor]:
        """The gradient values ``step`` will apply here, writable (a loss scale checks them for overflow
        and unscales them in place before the step)."""
        return self.local.grads() + self.replicas.grads()

    def discard(self) -> None:
        """Drop this step's gradients: the next ``step`` changes no row and no optimizer state."""
        self.local.discard()
        self.replicas.discard()

    def held_shards(self) -> list[tuple[str, Shard, torch.Tensor, dict[str, torch.Tensor]]]:
        """(table, shard, its rows here, its optimizer state) for every shard and replica held here;
        rows and state are views, so writing them changes the shard."""
        out = []
        for lookup in (self.local, self.replicas):
            for i, p in enumerate(lookup.placed):
                shard = p.shard if lookup is self.local else Shard(self.rank, 0, p.shard.num_rows, 0, p.shard.width)
                out.append((self.names[p.table], shard, *lookup.views(i)))
        return out

    def shard_weights(self) -> list[tuple[str, Shard, torch.Tensor]]:
        """(table, shard, this rank's rows of it) for every shard and replica held here."""
        return [(name, s, w) for name, s, w, _ in self.held_shards()]


class EmbeddingOptimizer:
    """The sparse optimizer as a training loop sees it (``step``, ``zero_grad``) for a collection
    whose rows may already have been updated inside backward by a fused kernel.

        optimizers = [torch.optim.Adam(dense_params), EmbeddingOptimizer(emb)]
    """

    def __init__(self, emb: ShardedEmbeddingCollection):
        self.emb = emb

    @property
    def lr(self) -> float:
        return self.emb.optim.lr

    def set_lr(self, lr: float) -> None:
        """Change the sparse learning rate of later steps: ``opt.set_lr(0.5 * opt.lr)``."""
        self.emb.set_lr(lr)

    def step(self) -> None:
        self.emb.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # step() clears the gradients it used; fused kernels make none
