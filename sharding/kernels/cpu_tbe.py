"""distrec's own CPU table-batched embedding: a C++ extension for the pooled lookup and the fused update.

    tbe = CpuTBE([(1000, 16), (50, 5)], OptimSpec("rowwise_adagrad", lr=0.05))
    out = tbe(torch.tensor([3, 7, 9, 1]), torch.tensor([0, 2, 3, 3, 4]))   # [2, 21]
    out.sum().backward()      # rows 3, 7, 9 of table 0 and row 1 of table 1 are updated here

Forward pools every (table, bag) in one call over all cores, sum pooling (the runtime divides mean
tables), any widths. Backward sorts each table's ids (counting or radix sort, tables in parallel), then
walks the distinct rows, spread evenly over the cores: a row's gradient is summed over its occurrences in
a local buffer and the optimizer of ``sharding.optim`` (sgd, adagrad, rowwise_adagrad, lazy adam, and the
L2 on touched rows) applied to it, each touched row and its state read and written once. No dense
gradient. The source is ``sharding/kernels/csrc/cpu_tbe.cpp``; ``setup.py`` builds it at install
(``make install``), never at run time. Without it ``unsupported`` says why and the runtime falls back.

Weights are stored in ``dtype``: fp32, fp16 or bf16 (half the memory and the bandwidth of the random row
reads); the optimizer state stays fp32. The forward converts each stored value to fp32 and sums in fp32;
the update runs the fp32 arithmetic on the stored weight converted to fp32 and stores the new value as
``sharding.rounding.round_to(new, dtype, stochastic_rounding, salt)`` does, bit for bit (the rule lives
there; the C++ repeats it: the hash, the add-and-truncate on the fp32 bits, then a conversion to nearest
even). The C++ is a template on the weight type and rounding, so the fp32 path is the float code as before.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from sharding.kernels import TableBatchedEmbedding, fused_lookup
from sharding.optim import OptimSpec, state_names
from sharding.rounding import DTYPES, salt_key

MAX_ROWS = 2**32 - 1  # the kernel sorts table-local ids as 32-bit keys
BUILD_HINT = "build it with `make install` or `python setup.py build_ext --inplace`"


@functools.lru_cache(maxsize=None)
def load():
    """(the compiled module, None), or (None, why it does not import)."""
    try:
        from sharding.kernels import _cpu_tbe
    except (ImportError, OSError) as e:  # not built, or built against another torch (undefined symbol)
        return None, f"{type(e).__name__}: {e}"
    return _cpu_tbe, None


def unsupported(shapes: list[tuple[int, int]], optim: OptimSpec, device: torch.device | str) -> str | None:
    """Why CpuTBE cannot run these shapes on ``device`` here, or None if it can."""
    if torch.device(device).type != "cpu":
        return f"distrec's CPU kernel runs on CPU tensors only, not {torch.device(device).type}"
    module, error = load()
    if module is None:
        return f"distrec's CPU kernel is not importable ({error}); {BUILD_HINT}"
    big = [rows for rows, _ in shapes if rows > MAX_ROWS]
    if big:
        return f"distrec's CPU kernel takes tables of at most {MAX_ROWS} rows, got {big[0]}"
    return None


def round_like_the_kernel(x: torch.Tensor, dtype: torch.dtype, stochastic: bool, salt: int) -> torch.Tensor:
    """fp32 ``x`` in ``dtype`` as the kernel's update stores it (its own C++ rounding; the tests hold it to
    ``sharding.rounding.round_to``)."""
    out = torch.empty(x.shape, dtype=dtype)
    load()[0].round_into(out, x.float().contiguous(), stochastic, salt_key(salt))
    return out


class CpuTBE(TableBatchedEmbedding):
    """T tables of ``shapes`` [(rows, width)] in one flat ``dtype`` buffer; ``optim`` is applied inside backward.

    Optimizer state is fp32 in flat buffers laid out like the weights ("row_col"), one value per row of
    all tables ("row"), or one Adam step count shared by the tables ("scalar": every table takes a step on
    every backward). Per-sample weights scale the rows but get no gradient. The storage is buffers, not
    parameters: dense optimizers and DDP must not see the tables. Weights in ``dtype`` (fp32, fp16, bf16),
    half ones rounded stochastically or to nearest (``stochastic_rounding``) with ``salt`` (module docstring).
    """

    def __init__(self, shapes: list[tuple[int, int]], optim: OptimSpec, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, stochastic_rounding: bool = True):
        super().__init__()
        if dtype not in DTYPES.values():
            raise ValueError(f"CpuTBE stores fp32, fp16 or bf16 weights, got {dtype}")
        why = unsupported(shapes, optim, device)
        if why:
            raise RuntimeError(f"CpuTBE cannot run here: {why}")
        module, _ = load()
        self.kernel_module = module
        self.shapes, self.optim = [(int(r), int(w)) for r, w in shapes], optim
        self.dtype, self.stochastic_rounding, self.salt = dtype, bool(stochastic_rounding), 0
        self.kernel = module.Kernel([r for r, _ in self.shapes], [w for _, w in self.shapes])
        self._code = {"sgd": module.SGD, "adagrad": module.ADAGRAD, "rowwise_adagrad": module.ROWWISE_ADAGRAD,
                      "adam": module.ADAM}[optim.kind]
        self._row_starts = [0]
        self._weight_starts = [0]
        for rows, width in self.shapes:
            self._row_starts.append(self._row_starts[-1] + rows)
            self._weight_starts.append(self._weight_starts[-1] + rows * width)
        self.register_buffer("weights", self._buffer(self._weight_starts[-1], dtype))
        self._init_weights()
        self._init_state()

    def _buffer(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Zeros on huge pages where the kernel grants them (before the first touch): the lookups and
        updates read rows at random, and 4 KiB pages would miss the TLB on almost every row."""
        flat = torch.empty(numel, dtype=dtype)
        self.kernel_module.advise_huge_pages(flat)
        return flat.zero_()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # As TritonTBE: DLRM's uniform(+-sqrt(1 / rows)) from a generator of its own, so the global stream
        # (the dense MLP's initialisation) does not depend on the kernel; the runtime overwrites the rows.
        # Half tables draw the fp32 values and round them to nearest, as a checkpoint loads (fp32 ones draw
        # in place: copy_ of a tensor onto itself does nothing).
        gen = torch.Generator().manual_seed(0)
        for w, (rows, _) in zip(self.table_weights(), self.shapes):
            drawn = w if w.dtype == torch.float32 else torch.empty(w.shape)
            drawn.uniform_(-math.sqrt(1.0 / max(rows, 1)), math.sqrt(1.0 / max(rows, 1)), generator=gen)
            w.copy_(drawn)

    def _init_state(self) -> None:
        names = state_names(self.optim.kind)
        for name in ("sum", "exp_avg", "exp_avg_sq"):
            if name in names:
                self.register_buffer(name, self._buffer(self._weight_starts[-1]))
        if "row_sum" in names:
            self.register_buffer("row_sum", self._buffer(self._row_starts[-1]))
        if "step" in names:  # float32 as in SparseOptimizer
            self.register_buffer("step", torch.zeros((), dtype=torch.float32))

    def set_lr(self, lr: float) -> None:
        self.optim = dataclasses.replace(self.optim, lr=lr)  # read at each backward

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
                    views[name] = buf[self._row_starts[t]:self._row_starts[t] + rows]
                else:
                    views[name] = self._table_view(buf, t)
            out.append(views)
        return out

    def _table_view(self, flat: torch.Tensor, t: int) -> torch.Tensor:
        rows, width = self.shapes[t]
        start = self._weight_starts[t]
        return flat[start:start + rows * width].view(rows, width)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        T = len(self.shapes)
        if offsets.dim() != 1 or T == 0 or (offsets.numel() - 1) % T:
            raise ValueError(f"offsets must hold T * B + 1 = {T} * B + 1 values, got {offsets.numel()}")
        if per_sample_weights is not None:
            if per_sample_weights.shape != indices.shape:
                raise ValueError("per_sample_weights must be aligned with indices")
            per_sample_weights = per_sample_weights.detach().float().contiguous()  # no gradient for them
        return fused_lookup(self, indices.long().contiguous(), offsets.long().contiguous(), per_sample_weights)

    def pool(self, indices: torch.Tensor, offsets: torch.Tensor,
             per_sample_weights: torch.Tensor | None) -> torch.Tensor:
        """The forward kernel alone: [B, total width]."""
        return self.kernel.forward(self.weights, indices, offsets, per_sample_weights)

    @torch.no_grad()
    def apply_gradient(self, grad: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                       per_sample_weights: torch.Tensor | None) -> None:
        """Backward fused with the optimizer: ``grad`` is d(loss)/d(output) [B, total width]."""
        step_size = self._adam_step_size()  # counted on every backward, touched rows or not
        beta1, beta2 = self.optim.betas
        self.kernel.backward_update(
            self.weights, grad.float().contiguous(), indices, offsets, per_sample_weights, self._code,
            self.optim.lr, self.optim.eps, beta1, beta2, self.optim.l2, step_size,
            getattr(self, "sum", getattr(self, "exp_avg", None)), getattr(self, "exp_avg_sq", None),
            getattr(self, "row_sum", None), self.stochastic_rounding, salt_key(self.salt))
        self.salt += 1  # the next backward rounds with other random bits (TableBatchedEmbedding)

    def _adam_step_size(self) -> float:
        """Adam: count this step, return lr * sqrt(1 - b2^t) / (1 - b1^t) in float64 as the reference does."""
        if self.optim.kind != "adam":
            return 0.0
        self.step += 1
        t = int(self.step)
        beta1, beta2 = self.optim.betas
        return self.optim.lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
