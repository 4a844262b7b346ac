"""Triton kernels behind ``sharding.kernels.triton_tbe.TritonTBE`` (imported lazily by it).

    pool_bags[(triton.cdiv(T * B, 32),)](weights, weight_offsets, col_offsets, indices, offsets, indices, out,
                                         T * B, B, out.stride(0), HAS_WEIGHTS=False, MEAN=False, BAGS=32,
                                         BLOCK_IDS=1, BLOCK_COLS=128)

All tables live in one flat buffer: table t's row r starts at ``weight_offsets[t] + r * width_t``, and its
width is ``col_offsets[t + 1] - col_offsets[t]`` (fbgemm's weights_offsets / D_offsets). A program owns a
whole row (``BLOCK_COLS`` >= the widest table), because row-wise Adagrad needs the full row's gradient.

Triton decides once per process, when it is imported, whether ``@triton.jit`` compiles for the GPU or
runs in its interpreter (TRITON_INTERPRET=1): even ``tl.zeros`` and ``tl.sum`` are jit functions made at
import. So these kernels run on CPU tensors only in a process that set TRITON_INTERPRET=1 before it first
imported triton; ``INTERPRETED`` says which mode this process got.
"""
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from sharding import rounding

# Optimizer codes, passed as a constexpr so each optimizer compiles to its own kernel. The kernels' copies
# are tl.constexpr because compiled kernels may read no other kind of global.
OPTIM_CODES = {"sgd": 0, "adagrad": 1, "rowwise_adagrad": 2, "adam": 3}
SGD = tl.constexpr(OPTIM_CODES["sgd"])
ADAGRAD = tl.constexpr(OPTIM_CODES["adagrad"])
ROWWISE_ADAGRAD = tl.constexpr(OPTIM_CODES["rowwise_adagrad"])
# How update_rows rounds the fp32 result to the weights' dtype (a constexpr): by the conversion alone (to
# nearest even; exact for fp32), stochastically (sharding.rounding), or to nearest in integer ops (bf16
# under the interpreter only: its fp32 -> bf16 conversion truncates, the GPU's rounds to nearest).
ROUNDING_CODES = {"convert": 0, "stochastic": 1, "nearest_in_bits": 2}
CONVERT = tl.constexpr(ROUNDING_CODES["convert"])
STOCHASTIC = tl.constexpr(ROUNDING_CODES["stochastic"])
BF16_DROPPED_BITS = tl.constexpr(rounding.DROPPED_BITS[rounding.DTYPES["bf16"]])
# sharding.rounding's hash constants, and the fp32 exponent field (all ones: inf or nan).
HASH_MUL1 = tl.constexpr(rounding.HASH_MUL1)
HASH_MUL2 = tl.constexpr(rounding.HASH_MUL2)
EXPONENT_BITS = tl.constexpr(0x7F800000)


@triton.jit
def _hash32(h):
    """sharding.rounding.hash32 on uint32 values already xor-ed with the key: the products wrap at 32
    bits and the shifts are logical, as the reference's masked int64 ones."""
    h = h ^ (h >> 16)
    h = h * HASH_MUL1
    h = h ^ (h >> 15)
    h = h * HASH_MUL2
    return h ^ (h >> 16)


@triton.jit
def _round_in_bits(w, key, ROUNDING: tl.constexpr, DROPPED_BITS: tl.constexpr):
    """fp32 ``w`` with its low DROPPED_BITS bits rounded off: stochastically as
    sharding.rounding.round_to(w, dtype, True, salt) does (``key``: salt_key(salt) as uint32), or to
    nearest even. The result is exact in the storage dtype, but for fp16's subnormals and overflow, which
    the conversion then rounds to nearest as torch's does. Inf and nan are returned as they are."""
    bits = w.to(tl.uint32, bitcast=True)
    if ROUNDING == STOCHASTIC:
        add = _hash32(bits ^ key) & ((1 << DROPPED_BITS) - 1)
    else:  # just under half a kept unit, plus the kept lsb: ties go to even
        add = ((1 << (DROPPED_BITS - 1)) - 1) + ((bits >> DROPPED_BITS) & 1)
    # Added to the pattern (sign and magnitude), ``add`` carries into the kept bits with probability equal
    # to the dropped fraction (stochastic), or when that is over half or half with an odd kept lsb
    # (nearest); a finite value cannot carry past the sign bit.
    rounded = (((bits + add) >> DROPPED_BITS) << DROPPED_BITS).to(tl.float32, bitcast=True)
    return tl.where((bits & EXPONENT_BITS) == EXPONENT_BITS, w, rounded)


@triton.jit
def _bf16_of_exact(w):
    """fp32 ``w`` exact in bf16 (low 16 bits zero, or inf/nan) as bf16: its high half, bit for bit. No
    conversion: the interpreter's flushes or garbles fp32 subnormals; on the GPU this is a shift."""
    high = w.to(tl.uint32, bitcast=True) >> 16
    high = tl.where(w != w, high | 0x40, high)  # a nan stays a nan (its payload may be in the low half)
    return high.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def pool_bags(weights, weight_offsets, col_offsets, indices, offsets, per_sample_weights, out,
              num_bags, batch_size, out_row_stride,
              HAS_WEIGHTS: tl.constexpr, MEAN: tl.constexpr, BAGS: tl.constexpr, BLOCK_IDS: tl.constexpr,
              BLOCK_COLS: tl.constexpr):
    """Program k pools bags k * BAGS ... k * BAGS + BAGS - 1; bag t * batch_size + b (bag b of table t)
    goes to out[b, table t's columns]. Each iteration loads BLOCK_IDS ids of every bag: BAGS * BLOCK_IDS
    rows in flight at once, which is what feeds the memory system (one-hot: many bags, one id each;
    multi-hot: fewer bags, more ids each)."""
    bag = tl.program_id(0) * BAGS + tl.arange(0, BAGS)
    bag_ok = bag < num_bags
    table = bag // batch_size
    sample = (bag - table * batch_size).to(tl.int64)
    start = tl.load(offsets + bag, mask=bag_ok, other=0)
    end = tl.load(offsets + bag + 1, mask=bag_ok, other=0)
    base = tl.load(weight_offsets + table, mask=bag_ok, other=0)
    col0 = tl.load(col_offsets + table, mask=bag_ok, other=0)
    width = tl.load(col_offsets + table + 1, mask=bag_ok, other=0) - col0  # 0 for bags past the end
    cols = tl.arange(0, BLOCK_COLS)
    col_ok = cols[None, :] < width[:, None]  # [BAGS, COLS]
    slots = tl.arange(0, BLOCK_IDS)
    acc = tl.zeros([BAGS, BLOCK_COLS], dtype=tl.float32)
    for j in range(0, tl.max(end - start, axis=0), BLOCK_IDS):
        pos = start[:, None] + j + slots[None, :]  # [BAGS, IDS]
        pos_ok = pos < end[:, None]
        ids = tl.load(indices + pos, mask=pos_ok, other=0).to(tl.int64)
        row_at = base[:, None] + ids * width[:, None]
        rows = tl.load(weights + row_at[:, :, None] + cols[None, None, :],
                       mask=pos_ok[:, :, None] & col_ok[:, None, :], other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            psw = tl.load(per_sample_weights + pos, mask=pos_ok, other=0.0).to(tl.float32)
            rows = rows * psw[:, :, None]
        acc += tl.sum(rows, axis=1)
    if MEAN:
        acc = acc / tl.maximum(end - start, 1).to(tl.float32)[:, None]
    tl.store(out + (sample * out_row_stride + col0)[:, None] + cols[None, :], acc, mask=col_ok)


@triton.jit
def _sum_grad(start, end, table, col0, cols, col_ok, order, bag_of, offsets, grad, grad_row_stride,
              per_sample_weights, batch_size,
              HAS_WEIGHTS: tl.constexpr, MEAN: tl.constexpr, BLOCK_IDS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Sum over sorted positions order[start:end] (all of one table) of the gradient each id got."""
    g = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    for chunk in range(start, end, BLOCK_IDS):
        p = chunk + tl.arange(0, BLOCK_IDS)
        p_ok = p < end
        pos = tl.load(order + p, mask=p_ok, other=0)
        bag = tl.load(bag_of + pos, mask=p_ok, other=0)
        sample = (bag - table * batch_size).to(tl.int64)
        tile = tl.load(grad + sample[:, None] * grad_row_stride + col0 + cols[None, :],
                       mask=p_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            tile = tile * tl.load(per_sample_weights + pos, mask=p_ok, other=0.0).to(tl.float32)[:, None]
        if MEAN:
            # The bag holds this occurrence, so its length is at least 1.
            length = tl.load(offsets + bag + 1, mask=p_ok, other=1) - tl.load(offsets + bag, mask=p_ok, other=0)
            tile = tile / length.to(tl.float32)[:, None]
        g += tl.sum(tile, axis=0)
    return g


@triton.jit
def sum_run_pieces(col_offsets, offsets, bag_of, order, piece_starts, piece_ends, grad, grad_row_stride,
                   per_sample_weights, partials, batch_size,
                   HAS_WEIGHTS: tl.constexpr, MEAN: tl.constexpr, BLOCK_IDS: tl.constexpr,
                   BLOCK_COLS: tl.constexpr):
    """Program k sums the gradient over piece k (order[piece_starts[k]:piece_ends[k]], part of one long
    run) into partials[k]. A hot row can occur hundreds of thousands of times in a batch: split into
    pieces, its sum is spread over many programs instead of one."""
    piece = tl.program_id(0)
    start = tl.load(piece_starts + piece)
    end = tl.load(piece_ends + piece)
    table = tl.load(bag_of + tl.load(order + start)) // batch_size
    col0 = tl.load(col_offsets + table)
    width = tl.load(col_offsets + table + 1) - col0
    cols = tl.arange(0, BLOCK_COLS)
    g = _sum_grad(start, end, table, col0, cols, cols < width, order, bag_of, offsets, grad, grad_row_stride,
                  per_sample_weights, batch_size, HAS_WEIGHTS, MEAN, BLOCK_IDS, BLOCK_COLS)
    tl.store(partials + piece.to(tl.int64) * BLOCK_COLS + cols, g)


# salt_key changes every step: specialising on its value (divisible by 16, say) would compile new variants.
@triton.jit(do_not_specialize=["salt_key"])
def update_rows(weights, weight_offsets, col_offsets, row_offsets, indices, offsets, bag_of, order,
                run_starts, num_runs, piece_first, partials, long_run, grad, grad_row_stride, per_sample_weights,
                state1, state2, row_state, step_size, lr, eps, one_minus_beta1, one_minus_beta2, l2, batch_size,
                salt_key,
                OPTIM: tl.constexpr, L2: tl.constexpr, HAS_WEIGHTS: tl.constexpr, MEAN: tl.constexpr, RUNS: tl.constexpr,
                BLOCK_COLS: tl.constexpr, ROUNDING: tl.constexpr, DROPPED_BITS: tl.constexpr):
    """Program k takes the distinct (table, row) pairs k * RUNS ... k * RUNS + RUNS - 1: sums each one's
    gradient over its occurrences, then applies the optimizer to those rows in place.

    ``order`` lists the positions in ``indices`` sorted by (table, row); run u (the occurrences of the
    u-th distinct row) is order[run_starts[u]:run_starts[u + 1]]. A run longer than ``long_run`` was
    summed by ``sum_run_pieces`` into partials[piece_first[u]:piece_first[u + 1]]; a shorter one is
    summed here, in occurrence order, one occurrence of every run of the program per iteration.
    ``bag_of[i]`` is the bag (t * batch_size + b) of position i.
    State layout: ``state1``/``state2`` are shaped like the flat weights (adagrad's sum; adam's m, v),
    ``row_state`` has one value per row of all tables (row-wise adagrad), ``step_size`` is adam's
    bias-corrected lr (a device scalar, so the step count never has to come back to the host).
    ``L2``: add ``l2 * w`` to each summed row gradient first (sharding.optim's L2 on touched rows: each
    row is one run, so once per step); a constexpr, so kernels without it are the ones of before.
    The new row is stored in the weights' dtype as ``ROUNDING`` (ROUNDING_CODES) says: converted to
    nearest (exact for fp32), or first rounded in bits by ``_round_in_bits`` (``salt_key``: salt_key(salt)
    as a signed 32-bit value; ``DROPPED_BITS``: rounding.DROPPED_BITS[dtype]); a constexpr too, so the
    kernels that only convert are the ones of before.
    """
    run = tl.program_id(0) * RUNS + tl.arange(0, RUNS)
    run_ok = run < num_runs
    start = tl.load(run_starts + run, mask=run_ok, other=0)
    length = tl.load(run_starts + run + 1, mask=run_ok, other=0) - start  # 0 for runs past the end
    first = tl.load(order + start, mask=run_ok, other=0)
    table = tl.load(bag_of + first, mask=run_ok, other=0) // batch_size
    row = tl.load(indices + first, mask=run_ok, other=0).to(tl.int64)
    col0 = tl.load(col_offsets + table, mask=run_ok, other=0)
    width = tl.load(col_offsets + table + 1, mask=run_ok, other=0) - col0
    cols = tl.arange(0, BLOCK_COLS)
    col_ok = cols[None, :] < width[:, None]  # [RUNS, COLS]

    g = tl.zeros([RUNS, BLOCK_COLS], dtype=tl.float32)
    direct = tl.where(length <= long_run, length, 0)
    for j in range(0, tl.max(direct, axis=0)):
        j_ok = j < direct
        pos = tl.load(order + start + j, mask=j_ok, other=0)
        bag = tl.load(bag_of + pos, mask=j_ok, other=0)
        sample = (bag - table * batch_size).to(tl.int64)
        tile = tl.load(grad + (sample * grad_row_stride + col0)[:, None] + cols[None, :],
                       mask=j_ok[:, None] & col_ok, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            tile = tile * tl.load(per_sample_weights + pos, mask=j_ok, other=0.0).to(tl.float32)[:, None]
        if MEAN:
            # The bag holds this occurrence, so its length is at least 1.
            bag_len = tl.load(offsets + bag + 1, mask=j_ok, other=1) - tl.load(offsets + bag, mask=j_ok, other=0)
            tile = tile / bag_len.to(tl.float32)[:, None]
        g += tile
    p0 = tl.load(piece_first + run, mask=run_ok, other=0)
    pieces = tl.where(length > long_run, tl.load(piece_first + run + 1, mask=run_ok, other=0) - p0, 0)
    for k in range(0, tl.max(pieces, axis=0)):
        k_ok = k < pieces
        g += tl.load(partials + (p0 + k)[:, None] * BLOCK_COLS + cols[None, :], mask=k_ok[:, None], other=0.0)

    at = (tl.load(weight_offsets + table, mask=run_ok, other=0) + row * width)[:, None] + cols[None, :]
    w = tl.load(weights + at, mask=col_ok, other=0.0).to(tl.float32)
    if L2:
        g = g + l2 * w
    # The formulas and their association follow sharding.optim.SparseOptimizer; *_rn keeps the GPU's
    # division and square root exact (IEEE round-to-nearest), as the reference's are.
    if OPTIM == SGD:
        w = w - lr * g
    elif OPTIM == ADAGRAD:
        s = tl.load(state1 + at, mask=col_ok, other=0.0) + g * g
        tl.store(state1 + at, s, mask=col_ok)
        w = w - lr * tl.div_rn(g, tl.sqrt_rn(s) + eps)
    elif OPTIM == ROWWISE_ADAGRAD:
        r = tl.load(row_offsets + table, mask=run_ok, other=0) + row
        mean_sq = tl.div_rn(tl.sum(g * g, axis=1), tl.maximum(width, 1).to(tl.float32))
        s = tl.load(row_state + r, mask=run_ok, other=0.0) + mean_sq
        tl.store(row_state + r, s, mask=run_ok)
        w = w - g * tl.div_rn(lr + tl.zeros_like(s), tl.sqrt_rn(s) + eps)[:, None]
    else:
        m = tl.load(state1 + at, mask=col_ok, other=0.0)
        v = tl.load(state2 + at, mask=col_ok, other=0.0)
        m = (g - m) * one_minus_beta1 + m
        v = (g * g - v) * one_minus_beta2 + v
        tl.store(state1 + at, m, mask=col_ok)
        tl.store(state2 + at, v, mask=col_ok)
        w = w - tl.load(step_size) * tl.div_rn(m, tl.sqrt_rn(v) + eps)
    if ROUNDING == CONVERT:
        # To nearest even (Triton's default fp_downcast_rounding for fp32 to fp16/bf16), as torch's .to().
        stored = w.to(weights.dtype.element_ty)
    else:
        w = _round_in_bits(w, salt_key.to(tl.uint32, bitcast=True), ROUNDING, DROPPED_BITS)
        if DROPPED_BITS == BF16_DROPPED_BITS:
            stored = _bf16_of_exact(w)
        else:  # fp16: exact, but subnormals and overflow, rounded to nearest even as torch's .to()
            stored = w.to(weights.dtype.element_ty)
    tl.store(weights + at, stored, mask=col_ok)


INTERPRETED = isinstance(pool_bags, InterpretedFunction)
