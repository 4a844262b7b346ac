"""The plain-PyTorch reference the table-batched kernels are held against (``F.embedding_bag(sparse=True)``
per table + ``SparseOptimizer``), its batches and its tolerances; tests/test_triton_tbe.py and
tests/test_cpu_tbe.py share them.

    ref = Reference(tbe.table_weights(), tbe.optim)
    batch = make_batch(seed=1, weighted=True)
    assert_within(train_step(tbe, *batch), ref.train_step(*batch), ref.forward_tol(*batch[:3]), "pooled")

Lookups draw rows below ``rows - UNTOUCHED`` only, so every table's last rows are never touched; a few
hot rows make ids repeat within and across bags; some bags are empty.

Batches are made on the CPU; the steps move them to the device of the kernel or of the reference's
tables, so the same checks hold a kernel on CUDA against the reference on CUDA (benchmarks/gpu_check.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sharding.kernels import TableBatchedEmbedding
from sharding.optim import OptimSpec, SparseOptimizer, state_names
from tests.tolerance import assert_within, sum_tol

# Widths that are multiples of 4 and ones that are not; one narrow table with few rows.
SHAPES = [(40, 8), (25, 5), (60, 16), (9, 3)]
BATCH, MAX_BAG, UNTOUCHED, HOT_ROWS = 7, 5, 2, 3  # 28 bags: forward programs of 8 end part-full
# A large eps, so putting it inside the square root (or leaving it out) would be caught.
OPTIM = dict(lr=0.05, eps=0.1, betas=(0.9, 0.999))
# Tolerances (tests/tolerance.py), per element from magnitudes the Reference measures. The kernel adds the
# same float32 terms as the reference in other orders (by program, in pieces for long runs):
# - a pooled value sums <= MAX_BAG terms |psw * row|: sum_tol(forward on |rows|, |psw|, MAX_BAG), plus
#   the rows' own differences after earlier steps, pooled;
# - a row's gradient sums its uses over the step, <= BATCH * MAX_BAG terms |psw * upstream|, and the update
#   takes <= 4 elementwise ops: N_STEP per step. A weight's error is <= N_STEP * EPS32 relative to each
#   update (its gradient not within rounding of 0: seeded data), so it is held to sum_tol(sum of |updates|,
#   steps * N_STEP) plus one rounding of |w| per step; an optimizer state (a sum of gradients, or of their
#   squares) to sum_tol(its gradients' sum|terms| (squared), steps * N_STEP (twice for squares)).
# With N_STEP = 39 over 3 steps an element is held to ~3e-5 of how far it moved; a missed or misplaced
# update is off by a whole update (~LR = 0.05 for the Adagrads and Adam, LR * |g| for SGD).
N_STEP = BATCH * MAX_BAG + 4


def on(device, *tensors):
    """``tensors`` on ``device`` (None stays None)."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def device_of(tbe: TableBatchedEmbedding) -> torch.device:
    return tbe.table_weights()[0].device


def make_batch(seed: int, weighted: bool, shapes=SHAPES, batch: int = BATCH, max_bag: int = MAX_BAG):
    """(indices, offsets, per_sample_weights or None, upstream gradient [batch, total width])."""
    gen = torch.Generator().manual_seed(seed)
    T = len(shapes)
    lengths = torch.randint(0, max_bag + 1, (T * batch,), generator=gen)
    lengths[seed % 4::4] = 0  # empty bags in every table
    ids = []
    for t, (rows, _) in enumerate(shapes):
        n = int(lengths[t * batch:(t + 1) * batch].sum())
        uniform = torch.randint(0, rows - UNTOUCHED, (n,), generator=gen)
        hot = torch.randint(0, HOT_ROWS, (n,), generator=gen)
        ids.append(torch.where(torch.rand(n, generator=gen) < 0.4, hot, uniform))
    indices = torch.cat(ids)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    psw = torch.rand(indices.numel(), generator=gen) + 0.5 if weighted else None
    upstream = torch.randn(batch, sum(w for _, w in shapes), generator=gen)
    return indices, offsets, psw, upstream


class Reference:
    """One fp32 parameter per table, ``F.embedding_bag(sparse=True)`` each, one SparseOptimizer."""

    def __init__(self, tables: list[torch.Tensor], optim: OptimSpec, pooling: str = "sum", max_bag: int = MAX_BAG,
                 n_step: int = N_STEP):
        # max_bag, n_step: those of the batches it will see (make_batch's max_bag, N_STEP for their batch)
        self.max_bag, self.n_step = max_bag, n_step
        self.params = [nn.Parameter(w.detach().float().clone()) for w in tables]
        self.opt = SparseOptimizer(self.params, optim.kind, optim.lr, optim.eps, optim.betas, l2=optim.l2)
        self.pooling, self.l2 = pooling, optim.l2
        # the magnitudes the tolerances scale with (see N_STEP): per element, |w| at the start, the sum of
        # |each update|, the sum over steps of its gradient's sum|terms|
        self.start = [p.detach().abs() for p in self.params]
        self.moved = [torch.zeros_like(p) for p in self.params]
        self.grad_mag = [torch.zeros_like(p) for p in self.params]
        self.steps = 0

    def magnitude_pass(self, indices, offsets, psw, upstream) -> torch.Tensor:
        """The step on |rows|, |psw| and |upstream|: pooled sum|terms| (returned) and each row's gradient
        sum|terms| (added to ``grad_mag``)."""
        absolute = [nn.Parameter(p.detach().abs()) for p in self.params]
        saved, self.params = self.params, absolute
        try:
            out = self.forward(indices, offsets, None if psw is None else psw.abs())
        finally:
            self.params = saved
        (out * upstream.abs()).sum().backward()
        for mag, p in zip(self.grad_mag, absolute):
            if p.grad is not None:
                mag += p.grad.to_dense()
        return out.detach()

    def forward_tol(self, indices, offsets, psw) -> torch.Tensor:
        """A pooled value's bound: its own sum's, plus the rows' own differences (weight_tol) pooled."""
        psw = None if psw is None else psw.abs()
        saved = self.params
        try:
            self.params = [nn.Parameter(p.detach().abs()) for p in saved]
            own = sum_tol(self.forward(*on(self.start[0].device, indices, offsets, psw)).detach(), self.max_bag)
            self.params = [nn.Parameter(self.weight_tol(t)) for t in range(len(saved))]
            return own + self.forward(*on(self.start[0].device, indices, offsets, psw)).detach()
        finally:
            self.params = saved

    def weight_tol(self, t: int) -> torch.Tensor:
        return sum_tol(self.moved[t], self.steps * self.n_step) + sum_tol(self.start[t] + self.moved[t], self.steps)

    def state_tol(self, t: int, name: str) -> torch.Tensor:
        squared = name in ("sum", "row_sum", "exp_avg_sq")
        mag = self.grad_mag[t] ** 2 if squared else self.grad_mag[t]
        mag = mag.max(1).values if name == "row_sum" else mag
        return sum_tol(mag, self.steps * self.n_step * (2 if squared else 1))

    def forward(self, indices, offsets, psw) -> torch.Tensor:
        batch = (offsets.numel() - 1) // len(self.params)
        outs = []
        for t, p in enumerate(self.params):
            lo, hi = int(offsets[t * batch]), int(offsets[(t + 1) * batch])
            outs.append(F.embedding_bag(indices[lo:hi], p, offsets[t * batch:(t + 1) * batch] - lo,
                                        mode=self.pooling, sparse=True,
                                        per_sample_weights=None if psw is None else psw[lo:hi]))
        return torch.cat(outs, dim=1)

    def train_step(self, indices, offsets, psw, upstream) -> torch.Tensor:
        indices, offsets, psw, upstream = on(self.start[0].device, indices, offsets, psw, upstream)
        self.opt.zero_grad(set_to_none=True)
        before = [p.detach().clone() for p in self.params]
        out = self.forward(indices, offsets, psw)
        (out * upstream).sum().backward()
        self.opt.step()
        for moved, b, p in zip(self.moved, before, self.params):
            moved += (p.detach() - b).abs()
        self.magnitude_pass(indices, offsets, psw, upstream)
        if self.l2:  # the L2 term l2 * w is one more term of each touched row's gradient (bounded by |w|'s)
            for t, mag in enumerate(self.grad_mag):
                mag += self.l2 * (self.start[t] + self.moved[t])
        self.steps += 1
        return out.detach()

    def states(self) -> list[dict[str, torch.Tensor]]:
        return [self.opt.state[p] for p in self.params]


def train_step(tbe: TableBatchedEmbedding, indices, offsets, psw, upstream) -> torch.Tensor:
    indices, offsets, psw, upstream = on(device_of(tbe), indices, offsets, psw, upstream)
    out = tbe(indices, offsets, psw)
    (out * upstream).sum().backward()
    return out.detach()


def assert_same_tables(tbe: TableBatchedEmbedding, ref: Reference) -> None:
    for t, (ours, theirs) in enumerate(zip(tbe.table_weights(), ref.params)):
        assert_within(ours.float(), theirs.data, ref.weight_tol(t), f"table {t}")


def assert_same_states(tbe: TableBatchedEmbedding, ref: Reference) -> None:
    for t, (ours, theirs) in enumerate(zip(tbe.table_states(), ref.states())):
        assert set(ours) == set(state_names(tbe.optim.kind)), t
        for name, value in ours.items():
            if name == "step":
                assert int(value) == int(theirs[name]), t
            else:
                assert_within(value, theirs[name], ref.state_tol(t, name), f"table {t} {name}")


def train_three_steps_against(tbe, ref, seed: int, weighted: bool, **batch_args) -> None:
    """Three training steps on both: the same outputs each step, then the same tables and optimizer state."""
    for step in range(3):
        batch = make_batch(seed=seed + step, weighted=weighted, **batch_args)
        tol = ref.forward_tol(*batch[:3])
        assert_within(train_step(tbe, *batch), ref.train_step(*batch), tol, f"step {step} pooled")
    assert_same_tables(tbe, ref)
    assert_same_states(tbe, ref)


def train_with_l2_and_a_changed_lr_against(tbe, ref, fresh: TableBatchedEmbedding) -> None:
    """Three weighted steps, the learning rate quartered before the last on both; the same outputs,
    tables and state, and the rows no batch touched equal to ``fresh``'s (same seeded init): L2 acts on
    touched rows only."""
    for step in range(3):
        if step == 2:
            tbe.set_lr(OPTIM["lr"] / 4)
            ref.opt.param_groups[0]["lr"] = OPTIM["lr"] / 4
        batch = make_batch(seed=80 + step, weighted=True)
        assert_within(train_step(tbe, *batch), ref.train_step(*batch), ref.forward_tol(*batch[:3]), f"step {step}")
    assert_same_tables(tbe, ref)
    assert_same_states(tbe, ref)
    untouched = [w[-UNTOUCHED:] for w in tbe.table_weights()]
    assert all(torch.equal(u, f[-UNTOUCHED:]) for u, f in zip(untouched, fresh.table_weights()))


def check_sharded_collection_matches_torch_kernel(kernel: str, kind: str, device="cpu") -> None:
    """The runtime's lookup on ``kernel`` (one rank, test_sharded's mixed plan) against its plain-PyTorch one,
    both on ``device``: pooled outputs over two steps, then the tables."""
    from sharding.runtime import ShardedEmbeddingCollection
    from tests.test_sharded import TABLES, make_batch as sharded_batch, make_plan

    results = {}
    for name in (kernel, "torch"):
        emb = ShardedEmbeddingCollection(TABLES, make_plan(1, kind, "torch"), seed=0, optim=OptimSpec(kind, 0.1),
                                         kernel=name, device=device)
        assert emb.kernel == name
        pooled = []
        start = [w.abs() for _, _, w in emb.shard_weights()]
        moved = [torch.zeros_like(w) for w in start]
        for step in range(2):
            before = [w.clone() for _, _, w in emb.shard_weights()]
            jb, upstream = sharded_batch(step)
            jb, upstream = jb.to(device), upstream.to(device)
            out = emb(jb)
            (out * upstream).sum().backward()
            emb.sync_replica_grads()
            emb.step()
            pooled.append(out.detach())
            for m, b, (_, _, w) in zip(moved, before, emb.shard_weights()):
                m += (w - b).abs()
        results[name] = pooled, [(n, w.clone()) for n, _, w in emb.shard_weights()], start, moved
    # As above (N_STEP): test_sharded's bags hold <= 4 ids, weights < 1, rows <= sqrt(1 / 7) in magnitude;
    # a row's gradient sums <= 23 samples * 4 ids per step. A wrong row moves a pooled value by ~0.1.
    # The second step's lookups also see the first update's differences: <= 4 rows' worth (the final
    # bound, which is larger, stands in for it).
    _, tables, start, moved = results["torch"]
    table_tols = [sum_tol(m, 2 * (23 * 4 + 4)) + sum_tol(s + m, 2) for s, m in zip(start, moved)]
    pooled_tol = sum_tol(4 * (1 / 7) ** 0.5, 4) + 4 * max(float(t.max()) for t in table_tols)
    for got, want in zip(results[kernel][0], results["torch"][0]):
        assert_within(got, want, pooled_tol, f"{kind}: pooled")
    for (shard, got), (_, want), tol in zip(results[kernel][1], tables, table_tols):
        assert_within(got, want, tol, f"{kind}: table {shard}")


def check_half_storage_rounds_like_the_reference(make_tbe, dtype: torch.dtype, kind: str, stochastic: bool,
                                                 weighted: bool = True, steps: int = 3, **batch_args) -> None:
    """A ``dtype`` kernel against the same kernel in fp32 started from the same (half) weights and state,
    ``steps`` steps: each step, the half kernel's rows must be exactly ``round_to`` of the fp32 kernel's
    (``sharding.rounding``; salt = the step), its untouched rows unchanged and its fp32 state the fp32
    kernel's exactly; then the fp32 kernel takes the half weights again. ``make_tbe(dtype,
    stochastic_rounding)`` builds the kernel under test (for ``make_batch(**batch_args)``'s shapes). Exact, not
    within a tolerance: both run the same fp32 arithmetic on the same values and only the final store differs."""
    from sharding.rounding import round_to

    half, full = make_tbe(dtype, stochastic), make_tbe(torch.float32, stochastic)
    assert half.table_weights()[0].dtype == dtype
    for step in range(steps):
        with torch.no_grad():
            for w32, w16 in zip(full.table_weights(), half.table_weights()):
                w32.copy_(w16.float())
        before = [w.clone() for w in half.table_weights()]
        batch = make_batch(seed=40 + step, weighted=weighted, **batch_args)
        out16, out32 = train_step(half, *batch), train_step(full, *batch)
        assert out16.dtype == torch.float32
        assert torch.equal(out16, out32), f"{dtype} step {step}: forward pools the stored values in fp32"
        for t, (w16, w32, b) in enumerate(zip(half.table_weights(), full.table_weights(), before)):
            want = round_to(w32, dtype, stochastic, salt=step)
            touched = (w32 != b.float()).any(1)
            assert torch.equal(w16[touched], want[touched]), f"{dtype} step {step} table {t}: rounding"
            assert torch.equal(w16[~touched], b[~touched]), f"{dtype} step {step} table {t}: untouched rows"
        for t, (s16, s32) in enumerate(zip(half.table_states(), full.table_states())):
            for name in s16:
                assert s16[name].dtype == torch.float32 and torch.equal(s16[name], s32[name]), (t, name)


def check_sub_ulp_updates_survive(make_tbe, dtype: torch.dtype, steps: int = 64) -> None:
    """SGD steps of a tenth of a unit in the last place of ``dtype``: rounded to nearest they are all lost;
    rounded stochastically the rows move by ``steps`` updates on average. ``make_tbe(dtype,
    stochastic_rounding, shapes, optim)``. The 64 elements start at 64 different stored values of one
    binade ([0.5, 1): one ulp for all), so their roundings are independent draws of the hash; each one's
    distance moved after ``steps`` steps has mean 0.1 * steps ulp and a standard deviation of at most
    sqrt(steps * 0.1 * 0.9) ulp, so their mean's is below 0.3 * sqrt(steps / 64) = 0.3 ulp at 64 steps; the
    test allows 0.04 * steps = 2.6 ulp (over 8 standard deviations)."""
    from sharding.rounding import ulp

    results = {}
    for stochastic in (False, True):
        tbe = make_tbe(dtype, stochastic, [(16, 4)], OptimSpec("sgd", lr=1.0))
        step_ulp = float(ulp(torch.tensor(0.625), dtype))
        start = (0.625 + step_ulp * torch.arange(64, dtype=torch.float32)).view(16, 4)
        with torch.no_grad():
            tbe.table_weights()[0].copy_(start)  # exact in dtype: 0.625 + j ulp, all below 1
        start = start.to(device_of(tbe))
        indices, offsets = on(device_of(tbe), torch.arange(16), torch.arange(17))
        for _ in range(steps):
            out = tbe(indices, offsets)
            (out * (0.1 * step_ulp)).sum().backward()  # each element's gradient: 0.1 ulp; lr = 1
        results[stochastic] = (start - tbe.table_weights()[0].float()).mean().item() / step_ulp
    assert results[False] == 0.0, results
    assert abs(results[True] - 0.1 * steps) <= 0.04 * steps, results
