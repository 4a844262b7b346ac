"""distrec's own table-batched embedding: Triton kernels for the pooled lookup and the fused update.

    tbe = TritonTBE([(1000, 16), (50, 8)], OptimSpec("adagrad", lr=0.05), device="cuda")
    out = tbe(torch.tensor([3, 7, 9, 1], device="cuda"), torch.tensor([0, 2, 3, 3, 4], device="cuda"))
    out.sum().backward()      # rows 3, 7, 9 of table 0 and row 1 of table 1 are updated here

Forward is one kernel launch for all tables and bags, writing [B, sum of widths] directly (table t's
columns after table t-1's: per sample, the row the output all-to-all sends), fp32 accumulation whatever
the storage dtype (fp32, fp16, bf16). Backward sorts the ids by (table, row) with torch (sort, then
unique_consecutive for the runs of equal ids), then one kernel launch sums each distinct row's gradient
over its occurrences and applies the optimizer to that row in place; runs longer than LONG_RUN_IDS are
first summed in pieces by a second kernel. No dense gradient is ever made. Two host syncs per backward:
the number of distinct rows and of pieces size the grids.

Weights are stored in fp32, fp16 or bf16; optimizer state always in fp32. The update is computed in fp32
from the stored row and rounded once, at the store, by the rule of ``sharding.rounding.round_to`` (the
one every kernel and the reference follow, bit for bit): to nearest, or with ``stochastic_rounding``
(the default; half dtypes only) by adding hash bits of the value and the salt, the training step, before
truncating. The kernels' copy of the rule is ``triton_kernels._round_in_bits``. Under the interpreter
bf16 is rounded to nearest in integer ops too, and stored from fp32's high half: its fp32 -> bf16
conversion truncates and garbles subnormals (the GPU's rounds to nearest even, as torch's).

Needs only torch and Triton. On CUDA tensors the kernels are compiled; on CPU tensors they run under
Triton's interpreter, which Triton fixes per process when it is imported: set TRITON_INTERPRET=1 before
anything imports triton (``sharding.kernels.triton_kernels`` explains why). The interpreter is for
tests, not for speed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math

import torch

from sharding.kernels import TableBatchedEmbedding, fused_lookup
from sharding.optim import OptimSpec, state_names
from sharding.rounding import DROPPED_BITS, salt_key

POOLINGS = ("sum", "mean")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A program loads tiles of up to ROWS_IN_FLIGHT rows (bags' ids in forward, runs' occurrences in backward)
# of BLOCK_COLS >= the widest table, at most TILE_ELEMENTS values: enough loads in flight per program to
# feed memory, few masked lanes on one-hot batches. Reasoned for H100, not yet tuned on one.
ROWS_IN_FLIGHT = 32
TILE_ELEMENTS = 4096
# A run (the occurrences of one row in a batch) longer than LONG_RUN_IDS is summed in pieces of at most
# PIECE_IDS by separate programs first: on Criteo, tables of 3 to 100 rows take every sample's id, so
# one row can occur 65536 * 20 / 3 times, far too much for the one program that updates the row.
LONG_RUN_IDS = 16
PIECE_IDS = 1024


def available() -> bool:
    """Whether Triton is installed (this module imports it only when a TritonTBE is made)."""
    return importlib.util.find_spec("triton") is not None


def unsupported(device: torch.device | str) -> str | None:
    """Why TritonTBE cannot run on ``device`` in this process, or None if it can."""
    if not available():
        return "triton is not installed"
    from sharding.kernels import triton_kernels

    if torch.device(device).type == "cpu" and not triton_kernels.INTERPRETED:
        return "on CPU the Triton kernels need TRITON_INTERPRET=1, set before triton is first imported"
    if torch.device(device).type not in ("cpu", "cuda"):
        return f"no Triton backend for device {device}"
    return None


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _num_warps(tile_elements: int) -> int:
    # 16 values per thread: a full 4096-value tile gets 8 warps, a narrow one fewer.
    return max(1, min(8, tile_elements // 512))


def _tile_rows(block_cols: int) -> int:
    return max(1, min(ROWS_IN_FLIGHT, TILE_ELEMENTS // block_cols))


def _signed_key(salt: int) -> int:
    """salt_key(salt) as a signed 32-bit value: the kernel's argument is then always an i32 (one compiled
    variant), and the kernel bitcasts it back to the uint32 key."""
    key = salt_key(salt)
    return key - (1 << 32) if key >= 1 << 31 else key


class TritonTBE(TableBatchedEmbedding):
    """T tables of ``shapes`` [(rows, width)] in one flat buffer; ``optim`` is applied inside backward.

    Weights are kept in ``dtype`` (fp32, fp16 or bf16), optimizer state in fp32. The update is computed
    in fp32 and stored as ``sharding.rounding.round_to(new, dtype, stochastic_rounding, self.salt)``, bit
    for bit: stochastically rounded by default, to nearest with ``stochastic_rounding=False`` (fp32 is
    stored as computed either way). ``salt`` grows by one after every backward, with ids or without (as
    the other kernels' does, so a step without ids on this rank keeps the ranks' salts equal);
    ``set_salt`` sets it. ``pooling="mean"`` divides each bag by its length (empty bags give 0).
    Per-sample weights scale the rows but get no gradient. The storage is buffers, not parameters: dense
    optimizers and DDP must not see the tables.
    """

    def __init__(self, shapes: list[tuple[int, int]], optim: OptimSpec, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", pooling: str = "sum", stochastic_rounding: bool = True):
        super().__init__()
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"TritonTBE stores fp32, fp16 or bf16 weights, got {dtype}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        why = unsupported(device)
        if why:
            raise RuntimeError(f"TritonTBE cannot run here: {why}")
        self.shapes, self.optim, self.pooling = [(int(r), int(w)) for r, w in shapes], optim, pooling
        self.dtype, self.stochastic_rounding, self.salt = dtype, bool(stochastic_rounding), 0
        rows = torch.tensor([0] + [r for r, _ in self.shapes], dtype=torch.int64)
        widths = torch.tensor([0] + [w for _, w in self.shapes], dtype=torch.int64)
        row_offsets = rows.cumsum(0)  # [T + 1]: global row id of each table's row 0
        col_offsets = widths.cumsum(0)  # [T + 1]: each table's first output column
        weight_offsets = (rows * widths).cumsum(0)  # [T + 1]: each table's first element in the buffer
        self.register_buffer("row_offsets", row_offsets.to(device), persistent=False)
        self.register_buffer("col_offsets", col_offsets.to(device), persistent=False)
        self.register_buffer("weight_offsets", weight_offsets.to(device), persistent=False)
        # Host copies for the views, so taking them never waits on the device.
        self._row_starts, self._weight_starts = row_offsets.tolist(), weight_offsets.tolist()
        self.total_rows, self.total_width = self._row_starts[-1], int(col_offsets[-1])
        self.max_width = max((w for _, w in self.shapes), default=1)
        self.long_run_ids, self.piece_ids = LONG_RUN_IDS, PIECE_IDS  # tests lower them to split small runs
        self.register_buffer("weights", torch.empty(int(weight_offsets[-1]), dtype=dtype, device=device))
        self._init_weights()
        self._init_state(device)

    @torch.no_grad()
    def _init_weights(self) -> None:
        # DLRM's uniform(+-sqrt(1 / rows)) so a TritonTBE made alone trains; the runtime overwrites the
        # tables through table_weights() with its plan-independent init.
        # A generator of its own: drawing from the global RNG would change the dense MLP's initialisation
        # (made after the embeddings) with the kernel.
        gen = torch.Generator(device=self.weights.device).manual_seed(0)
        for w, (rows, _) in zip(self.table_weights(), self.shapes):
            bound = math.sqrt(1.0 / max(rows, 1))
            w.uniform_(-bound, bound, generator=gen)

    def _init_state(self, device) -> None:
        names = state_names(self.optim.kind)
        flat = self.weights.numel()
        for name in ("sum", "exp_avg", "exp_avg_sq"):
            if name in names:
                self.register_buffer(name, torch.zeros(flat, dtype=torch.float32, device=device))
        if "row_sum" in names:
            self.register_buffer("row_sum", torch.zeros(self.total_rows, dtype=torch.float32, device=device))
        if "step" in names:
            # One count for the module (every table takes a step on every backward), float32 as in
            # SparseOptimizer; table_states gives each table this same tensor.
            self.register_buffer("step", torch.zeros((), dtype=torch.float32, device=device))

    def set_lr(self, lr: float) -> None:
        # The lr is a kernel argument read from the spec at each backward (Adam's step size too).
        self.optim = dataclasses.replace(self.optim, lr=lr)

    def table_weights(self) -> list[torch.Tensor]:
        return [self._table_view(self.weights, t) for t in range(len(self.shapes))]

    def table_states(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for t, (rows, _) in enumerate(self.shapes):
            views = {}
            for name, rule in state_names(self.optim.kind).items():
                buf = getattr(self, name)
                if rule == "scalar":
                    views[name] = buf
                elif rule == "row":
                    start = self._row_starts[t]
                    views[name] = buf[start:start + rows]
                else:
                    views[name] = self._table_view(buf, t)
            out.append(views)
        return out

    def _table_view(self, flat: torch.Tensor, t: int) -> torch.Tensor:
        rows, width = self.shapes[t]
        start = self._weight_starts[t]
        return flat[start:start + rows * width].view(rows, width)

    @property
    def interpreted(self) -> bool:
        """Whether the kernels run under Triton's interpreter (CPU tests) rather than compiled."""
        from sharding.kernels import triton_kernels

        return triton_kernels.INTERPRETED

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        T = len(self.shapes)
        if offsets.dim() != 1 or T == 0 or (offsets.numel() - 1) % T:
            raise ValueError(f"offsets must hold T * B + 1 = {T} * B + 1 values, got {offsets.numel()}")
        if per_sample_weights is not None and per_sample_weights.shape != indices.shape:
            raise ValueError("per_sample_weights must be aligned with indices")
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.detach().contiguous()  # no gradient for them
        # The kernels index flat memory, so the ids must be dense.
        return fused_lookup(self, indices.contiguous(), offsets.contiguous(), per_sample_weights)

    def pool(self, indices: torch.Tensor, offsets: torch.Tensor,
             per_sample_weights: torch.Tensor | None) -> torch.Tensor:
        """The forward kernel alone: [B, total width] in fp32."""
        from sharding.kernels.triton_kernels import pool_bags

        bags = offsets.numel() - 1
        batch = bags // len(self.shapes)
        out = torch.empty(batch, self.total_width, dtype=torch.float32, device=self.weights.device)
        if bags == 0:
            return out
        block_cols = _next_power_of_2(self.max_width)
        rows = _tile_rows(block_cols)
        mean_ids = -(-indices.numel() // bags)  # the pooling factor sets ids per bag vs bags per program
        block_ids = min(rows, _next_power_of_2(mean_ids))
        bags_per_program = rows // block_ids
        pool_bags[(-(-bags // bags_per_program),)](
            self.weights, self.weight_offsets, self.col_offsets, indices, offsets,
            indices if per_sample_weights is None else per_sample_weights, out, bags, batch, out.stride(0),
            HAS_WEIGHTS=per_sample_weights is not None, MEAN=self.pooling == "mean", BAGS=bags_per_program,
            BLOCK_IDS=block_ids, BLOCK_COLS=block_cols, num_warps=_num_warps(rows * block_cols))
        return out

    @torch.no_grad()
    def apply_gradient(self, grad: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                       per_sample_weights: torch.Tensor | None) -> None:
        """Backward fused with the optimizer: ``grad`` is d(loss)/d(output) [B, total width]."""
        from sharding.kernels import triton_kernels as K

        step_size = self._adam_step_size()  # counted on every backward, touched rows or not
        # Likewise: a rank without ids this step keeps the salt every other rank (and kernel) has.
        salt, self.salt = self.salt, self.salt + 1
        if indices.numel() == 0:
            return
        grad = grad.to(torch.float32).contiguous()
        psw = indices if per_sample_weights is None else per_sample_weights  # any pointer when unused
        bag_of, order, run_starts = self._runs(indices, offsets)
        piece_first, partials = self._sum_long_runs(run_starts, bag_of, order, offsets, grad, per_sample_weights)
        kind = self.optim.kind
        state1 = getattr(self, "sum" if kind == "adagrad" else "exp_avg", self.weights)
        state2 = getattr(self, "exp_avg_sq", self.weights)
        row_state = getattr(self, "row_sum", self.weights)
        beta1, beta2 = self.optim.betas
        block_cols = _next_power_of_2(self.max_width)
        runs = run_starts.numel() - 1
        runs_per_program = _tile_rows(block_cols)
        K.update_rows[(-(-runs // runs_per_program),)](
            self.weights, self.weight_offsets, self.col_offsets, self.row_offsets, indices, offsets, bag_of,
            order, run_starts, runs, piece_first, partials, self.long_run_ids, grad, grad.stride(0), psw,
            state1, state2, row_state, self.weights if step_size is None else step_size,
            self.optim.lr, self.optim.eps, 1 - beta1, 1 - beta2, self.optim.l2, grad.shape[0], _signed_key(salt),
            OPTIM=K.OPTIM_CODES[kind], L2=self.optim.l2 != 0.0, HAS_WEIGHTS=per_sample_weights is not None, MEAN=self.pooling == "mean",
            RUNS=runs_per_program, BLOCK_COLS=block_cols, num_warps=_num_warps(runs_per_program * block_cols),
            enable_fp_fusion=False,  # a separate multiply and add round as the reference's do
            **self._rounding())

    def _rounding(self) -> dict:
        """The update kernel's rounding constexprs (triton_kernels.ROUNDING_CODES): stochastic for half
        dtypes when asked, else to nearest by the conversion, but for bf16 under the interpreter, whose
        conversion truncates."""
        from sharding.kernels.triton_kernels import ROUNDING_CODES

        if self.dtype not in DROPPED_BITS:
            return dict(ROUNDING=ROUNDING_CODES["convert"], DROPPED_BITS=0)
        if self.stochastic_rounding:
            how = "stochastic"
        else:
            how = "nearest_in_bits" if self.dtype == torch.bfloat16 and self.interpreted else "convert"
        return dict(ROUNDING=ROUNDING_CODES[how], DROPPED_BITS=DROPPED_BITS[self.dtype] if how != "convert" else 0)

    def _sum_long_runs(self, run_starts, bag_of, order, offsets, grad, per_sample_weights):
        """Sum each run longer than ``long_run_ids`` in pieces of at most ``piece_ids`` occurrences, one
        program a piece. Returns (index of each run's first piece [runs + 1], piece sums [pieces, cols])."""
        from sharding.kernels.triton_kernels import sum_run_pieces

        device = run_starts.device
        counts = run_starts[1:] - run_starts[:-1]
        pieces = torch.where(counts > self.long_run_ids, (counts + self.piece_ids - 1) // self.piece_ids, 0)
        piece_first = torch.zeros_like(run_starts)
        torch.cumsum(pieces, 0, out=piece_first[1:])
        total = int(piece_first[-1])  # the second host sync: it sizes the pieces' grid
        block_cols = _next_power_of_2(self.max_width)
        partials = torch.empty(total, block_cols, dtype=torch.float32, device=device)
        if total == 0:
            return piece_first, partials
        run_of = torch.repeat_interleave(torch.arange(counts.numel(), device=device), pieces, output_size=total)
        piece_starts = run_starts[run_of] + self.piece_ids * (torch.arange(total, device=device) - piece_first[run_of])
        piece_ends = torch.minimum(piece_starts + self.piece_ids, run_starts[run_of + 1])
        sum_run_pieces[(total,)](
            self.col_offsets, offsets, bag_of, order, piece_starts, piece_ends, grad, grad.stride(0),
            order if per_sample_weights is None else per_sample_weights, partials, grad.shape[0],
            HAS_WEIGHTS=per_sample_weights is not None, MEAN=self.pooling == "mean",
            BLOCK_IDS=_tile_rows(block_cols), BLOCK_COLS=block_cols,
            num_warps=_num_warps(_tile_rows(block_cols) * block_cols))
        return piece_first, partials

    def _adam_step_size(self) -> torch.Tensor | None:
        """Adam: count this step, return lr * sqrt(1 - b2^t) / (1 - b1^t) as a device fp32 scalar."""
        if self.optim.kind != "adam":
            return None
        self.step += 1
        # In float64 like the reference's Python floats; no sync, the count stays on the device.
        t = self.step.double()
        beta1, beta2 = self.optim.betas
        return (self.optim.lr * torch.sqrt(1 - beta2**t) / (1 - beta1**t)).float()

    def _runs(self, indices: torch.Tensor, offsets: torch.Tensor):
        """(bag of each position, positions sorted by (table, row), start of each distinct row's run
        in that order plus the end); the sort is stable, so gradients sum in a fixed order."""
        n = indices.numel()
        bags = offsets.numel() - 1
        batch = bags // len(self.shapes)
        lengths = offsets[1:] - offsets[:-1]
        bag_of = torch.repeat_interleave(torch.arange(bags, dtype=torch.int32, device=indices.device),
                                         lengths, output_size=n)
        keys = self.row_offsets[(bag_of // batch).long()] + indices
        if self.total_rows < 2**31:
            keys = keys.to(torch.int32)  # a 32-bit radix sort does half the passes of a 64-bit one
        sorted_keys, order = torch.sort(keys, stable=True)
        # The first host sync of a backward: the number of distinct rows sizes the update's grid.
        _, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
        run_starts = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=indices.device)
        torch.cumsum(counts, 0, out=run_starts[1:])
        return bag_of, order, run_starts
