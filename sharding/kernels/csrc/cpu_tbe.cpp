// distrec's CPU table-batched embedding: pooled forward for T tables in one call, and backward fused
// with the sparse optimizer (sgd, adagrad, rowwise_adagrad, lazy adam; optional L2 on touched rows).
//
//     kernel = _cpu_tbe.Kernel([1000, 50], [16, 8])          # rows and width of each table
//     out = kernel.forward(weights, indices, offsets, None)   # [B, 24]
//     kernel.backward_update(weights, grad, indices, offsets, None, _cpu_tbe.ADAGRAD, lr, eps, ...)
//
// Layout: every table's rows in one flat buffer of fp32, fp16 or bf16 (table t at element weight_offsets[t],
// row-major [rows, width]); "row_col" optimizer state shaped the same, "row" state one value per row of all
// tables, state always fp32. Half weights are read into fp32 (forward sums and the update are fp32), and an
// updated value is stored back by a Store policy (below): to nearest, or stochastically by the rule of
// sharding/rounding.py, bit for bit. The kernels are templates on that policy, so the fp32 path is the
// plain float code it always was (no branch on the dtype in the loops).
// Bags are table-major: bag j of table t is indices[offsets[t*B+j] : offsets[t*B+j+1]].
//
// Backward: per table (tables in parallel), the (row id, position) pairs are sorted by id: a counting
// sort when the table's largest id is below its number of ids, else an LSD radix sort on 8-bit digits,
// stable, so a row's occurrences stay in position order and its gradient sums in a fixed order. Then the
// sorted positions of all tables, split evenly over the threads, are walked run by run (a run: the
// occurrences of one row): each row's gradient is summed into a small local buffer, the optimizer applied,
// and the row and its state read and written once. No dense gradient is formed. Random row reads are
// prefetched PREFETCH_AHEAD ids ahead, and the Python side puts the tables on huge pages (TLB misses).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <sys/mman.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

enum Optim : int64_t { SGD = 0, ADAGRAD = 1, ROWWISE_ADAGRAD = 2, ADAM = 3 };

constexpr int64_t FORWARD_GRAIN_BAGS = 64;       // bags per parallel task, at least
constexpr int64_t UPDATE_GRAIN_IDS = 1024;       // sorted positions per parallel task, at least
constexpr int64_t PREFETCH_AHEAD = 8;            // ids ahead whose rows are prefetched (random gathers)
constexpr int64_t FLOATS_PER_LINE = 16;          // 64-byte cache lines
constexpr int RADIX_BITS = 8;
constexpr int RADIX_BUCKETS = 1 << RADIX_BITS;
constexpr int MAX_RADIX_PASSES = 4;              // 32-bit keys

// A row about to be read (forward) or read and written (the update), one prefetch per cache line.
template <typename T>
inline void prefetch_read(const T* row, int64_t width) {
  constexpr int64_t per_line = FLOATS_PER_LINE * sizeof(float) / sizeof(T);
  for (int64_t j = 0; j < width; j += per_line) __builtin_prefetch(row + j, 0, 3);
}
template <typename T>
inline void prefetch_write(const T* row, int64_t width) {
  constexpr int64_t per_line = FLOATS_PER_LINE * sizeof(float) / sizeof(T);
  for (int64_t j = 0; j < width; j += per_line) __builtin_prefetch(row + j, 1, 3);
}

// A stored row added into an fp32 sum, times ``s`` (a per-sample weight) or not: a multiply then an add
// (no FMA: -ffp-contract=off), as the reference's embedding_bag rounds them.
template <typename W>
inline void add_row(float* __restrict__ o, const W* __restrict__ r, int64_t d) {
  for (int64_t j = 0; j < d; ++j) o[j] += float(r[j]);
}
template <typename W>
inline void add_scaled_row(float* __restrict__ o, const W* __restrict__ r, int64_t d, float s) {
  for (int64_t j = 0; j < d; ++j) o[j] += s * float(r[j]);
}
#if defined(__F16C__)
// fp16 rows 8 values at a time: c10::Half's conversion is scalar (measured: the forward of fp16 tables
// took twice fp32's time with it), F16C's vcvtph2ps converts 8 exactly in one instruction.
template <>
inline void add_row<c10::Half>(float* __restrict__ o, const c10::Half* __restrict__ r, int64_t d) {
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + j)));
    _mm256_storeu_ps(o + j, _mm256_add_ps(_mm256_loadu_ps(o + j), v));
  }
  for (; j < d; ++j) o[j] += float(r[j]);
}
template <>
inline void add_scaled_row<c10::Half>(float* __restrict__ o, const c10::Half* __restrict__ r, int64_t d, float s) {
  int64_t j = 0;
  const __m256 scale = _mm256_set1_ps(s);
  for (; j + 8 <= d; j += 8) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + j)));
    _mm256_storeu_ps(o + j, _mm256_add_ps(_mm256_loadu_ps(o + j), _mm256_mul_ps(scale, v)));
  }
  for (; j < d; ++j) o[j] += s * float(r[j]);
}
#endif

// Stochastic rounding as sharding/rounding.py's round_to: lowbias32(fp32 bits ^ key) gives the random
// bits; its low DROPPED bits are added to the fp32 bit pattern, which is then truncated to them (exact in
// the half type but for fp16's subnormals and overflow, which the final conversion rounds to nearest).
// key: sharding.rounding.salt_key(salt). Non-finite values are converted as they are.
inline uint32_t lowbias32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return h;
}

template <int DROPPED>
inline float add_noise_and_truncate(float x, uint32_t key) {
  constexpr uint32_t low = (1u << DROPPED) - 1;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t truncated = (bits + (lowbias32(bits ^ key) & low)) & ~low;
  float rounded;
  std::memcpy(&rounded, &truncated, sizeof rounded);
  return std::isfinite(x) ? rounded : x;
}

// How an updated fp32 value is stored: the weight type, and the conversion to it. c10::Half and
// c10::BFloat16 convert to nearest (ties to even), as torch's .to() does (NaN bits aside: torch writes a
// bf16 NaN as 0xffff, c10::BFloat16 as 0x7fc0).
struct StoreFloat {
  using type = float;
  float operator()(float x) const { return x; }
};
template <typename H>
struct StoreNearest {
  using type = H;
  H operator()(float x) const { return H(x); }
};
template <typename H>
struct StoreStochastic {
  using type = H;
  uint32_t key;
  // fp32 has 23 mantissa bits; bf16 keeps 7 and fp16 10 (sharding.rounding.DROPPED_BITS)
  static constexpr int dropped = std::is_same<H, c10::BFloat16>::value ? 16 : 13;
  H operator()(float x) const { return H(add_noise_and_truncate<dropped>(x, key)); }
};

// Calls f with a Store of the weights' type: fp32, or a half type to nearest or stochastically.
template <typename F>
void with_store(at::ScalarType dtype, bool stochastic, uint32_t key, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(StoreFloat{});
    case at::kHalf:
      return stochastic ? f(StoreStochastic<c10::Half>{key}) : f(StoreNearest<c10::Half>{});
    case at::kBFloat16:
      return stochastic ? f(StoreStochastic<c10::BFloat16>{key}) : f(StoreNearest<c10::BFloat16>{});
    default:
      TORCH_CHECK(false, "cpu_tbe: weights must be fp32, fp16 or bf16, got ", dtype);
  }
}

// The kernel's own rounding of fp32 src into out (fp32, fp16 or bf16, as many values): the tests hold it
// bit for bit to sharding.rounding.round_to.
void round_into(at::Tensor out, const at::Tensor& src, bool stochastic, int64_t key) {
  TORCH_CHECK(src.scalar_type() == at::kFloat && src.is_contiguous() && out.is_contiguous() &&
                  out.numel() == src.numel(),
              "cpu_tbe: round_into takes contiguous fp32 src and out of as many values");
  with_store(out.scalar_type(), stochastic, uint32_t(key), [&](auto store) {
    using W = typename decltype(store)::type;
    W* o = reinterpret_cast<W*>(out.data_ptr());
    const float* x = src.data_ptr<float>();
    for (int64_t i = 0; i < src.numel(); ++i) o[i] = store(x[i]);
  });
}

constexpr uintptr_t HUGE_PAGE_BYTES = 2 << 20;

// Asks the kernel for 2 MiB pages under a buffer not yet touched (transparent huge pages in "madvise"
// mode): random row gathers over a large table then miss the TLB far less. Returns whether it was taken.
bool advise_huge_pages(const at::Tensor& t) {
  uintptr_t lo = (reinterpret_cast<uintptr_t>(t.data_ptr()) + HUGE_PAGE_BYTES - 1) & ~(HUGE_PAGE_BYTES - 1);
  uintptr_t hi = (reinterpret_cast<uintptr_t>(t.data_ptr()) + t.nbytes()) & ~(HUGE_PAGE_BYTES - 1);
  if (hi <= lo) return false;
#ifdef MADV_HUGEPAGE
  return madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#else
  return false;
#endif
}

// Stable sort of (keys, vals)[0, n) by key; the result is in keys/vals. kt/vt: scratch of n.
// counts: scratch, resized as needed (the counting sort needs rows + 1).
void sort_pairs(uint32_t* keys, uint32_t* vals, uint32_t* kt, uint32_t* vt, int64_t n, uint32_t max_key,
                std::vector<uint32_t>& counts) {
  if (n <= 1) return;
  if (int64_t(max_key) < n) {  // counting sort: one histogram of the ids, O(rows + n)
    counts.assign(size_t(max_key) + 2, 0);
    for (int64_t i = 0; i < n; ++i) ++counts[keys[i] + 1];
    for (size_t k = 1; k < counts.size(); ++k) counts[k] += counts[k - 1];
    for (int64_t i = 0; i < n; ++i) {
      uint32_t at = counts[keys[i]]++;
      kt[at] = keys[i];
      vt[at] = vals[i];
    }
    std::memcpy(keys, kt, n * sizeof(uint32_t));
    std::memcpy(vals, vt, n * sizeof(uint32_t));
    return;
  }
  int bits = 32 - __builtin_clz(max_key);
  int passes = (bits + RADIX_BITS - 1) / RADIX_BITS;
  // All passes' histograms in one read of the keys; a digit every key shares needs no pass.
  uint32_t hist[MAX_RADIX_PASSES][RADIX_BUCKETS] = {};
  for (int64_t i = 0; i < n; ++i) {
    uint32_t k = keys[i];
    for (int p = 0; p < passes; ++p) ++hist[p][(k >> (p * RADIX_BITS)) & (RADIX_BUCKETS - 1)];
  }
  uint32_t *src_k = keys, *src_v = vals, *dst_k = kt, *dst_v = vt;
  for (int p = 0; p < passes; ++p) {
    int shift = p * RADIX_BITS;
    uint32_t* h = hist[p];
    if (h[(src_k[0] >> shift) & (RADIX_BUCKETS - 1)] == uint32_t(n)) continue;
    uint32_t sum = 0;
    for (int b = 0; b < RADIX_BUCKETS; ++b) {
      uint32_t c = h[b];
      h[b] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      uint32_t at = h[(src_k[i] >> shift) & (RADIX_BUCKETS - 1)]++;
      dst_k[at] = src_k[i];
      dst_v[at] = src_v[i];
    }
    std::swap(src_k, dst_k);
    std::swap(src_v, dst_v);
  }
  if (src_k != keys) {
    std::memcpy(keys, src_k, n * sizeof(uint32_t));
    std::memcpy(vals, src_v, n * sizeof(uint32_t));
  }
}

void check_ids(bool bad) { TORCH_CHECK(!bad, "cpu_tbe: an index is out of its table's rows"); }

class Kernel {
 public:
  Kernel(std::vector<int64_t> rows, std::vector<int64_t> widths) : rows_(rows), widths_(widths) {
    TORCH_CHECK(rows.size() == widths.size(), "cpu_tbe: rows and widths differ in length");
    int64_t T = rows.size();
    weight_offsets_.assign(T + 1, 0);
    row_offsets_.assign(T + 1, 0);
    col_offsets_.assign(T + 1, 0);
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(rows[t] >= 0 && rows[t] <= int64_t(UINT32_MAX), "cpu_tbe: a table has more than 2^32 rows");
      TORCH_CHECK(widths[t] > 0, "cpu_tbe: a table has width 0");
      weight_offsets_[t + 1] = weight_offsets_[t] + rows[t] * widths[t];
      row_offsets_[t + 1] = row_offsets_[t] + rows[t];
      col_offsets_[t + 1] = col_offsets_[t] + widths[t];
      max_width_ = std::max(max_width_, widths[t]);
    }
  }

  int64_t num_tables() const { return rows_.size(); }

  at::Tensor forward(const at::Tensor& weights, const at::Tensor& indices, const at::Tensor& offsets,
                     const c10::optional<at::Tensor>& psw) const {
    int64_t B = check_inputs(weights, indices, offsets, psw);
    const int64_t T = num_tables(), total_width = col_offsets_[T];
    at::Tensor out = at::empty({B, total_width}, weights.options().dtype(at::kFloat));
    with_store(weights.scalar_type(), false, 0, [&](auto store) {
      pool(reinterpret_cast<const typename decltype(store)::type*>(weights.data_ptr()), indices, offsets, psw,
           B, out);
    });
    return out;
  }

  // The forward's sums (fp32) of rows stored as W, into out [B, total width].
  template <typename W>
  void pool(const W* weights, const at::Tensor& indices, const at::Tensor& offsets,
            const c10::optional<at::Tensor>& psw, int64_t B, at::Tensor& out) const {
    const int64_t T = num_tables(), total_width = col_offsets_[T];
    const int64_t* idx = indices.data_ptr<int64_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    const float* pw = psw.has_value() ? psw->data_ptr<float>() : nullptr;
    float* O = out.data_ptr<float>();
    std::atomic<bool> bad{false};
    at::parallel_for(0, T * B, FORWARD_GRAIN_BAGS, [&](int64_t begin, int64_t end) {
      bool chunk_bad = false;
      for (int64_t k = begin; k < end; ++k) {
        const int64_t t = k / B, b = k % B, d = widths_[t], rows = rows_[t];
        const W* Wt = weights + weight_offsets_[t];
        const int64_t table_end = off[(t + 1) * B];
        float* __restrict__ o = O + b * total_width + col_offsets_[t];
        for (int64_t j = 0; j < d; ++j) o[j] = 0.0f;
        for (int64_t p = off[k]; p < off[k + 1]; ++p) {
          if (p + PREFETCH_AHEAD < table_end) {
            uint64_t ahead = idx[p + PREFETCH_AHEAD];
            if (ahead < uint64_t(rows)) prefetch_read(Wt + ahead * d, d);
          }
          const uint64_t id = idx[p];
          if (id >= uint64_t(rows)) {
            chunk_bad = true;
            continue;
          }
          const W* __restrict__ r = Wt + id * d;
          if (pw) {
            add_scaled_row(o, r, d, pw[p]);
          } else {
            add_row(o, r, d);
          }
        }
      }
      if (chunk_bad) bad = true;
    });
    check_ids(bad);
  }

  // The optimizer's update of the rows that grad (d loss / d output, [B, total width]) touches.
  // state1: "sum" (adagrad) or "exp_avg" (adam); state2: "exp_avg_sq"; row_state: "row_sum".
  // step_size: adam's lr * sqrt(1 - b2^t) / (1 - b1^t) for this step. Half weights are stored back
  // stochastically when stochastic, with rounding_key (sharding.rounding.salt_key of the salt).
  void backward_update(at::Tensor weights, const at::Tensor& grad, const at::Tensor& indices,
                       const at::Tensor& offsets, const c10::optional<at::Tensor>& psw, int64_t kind, double lr,
                       double eps, double beta1, double beta2, double l2, double step_size,
                       const c10::optional<at::Tensor>& state1, const c10::optional<at::Tensor>& state2,
                       const c10::optional<at::Tensor>& row_state, bool stochastic, int64_t rounding_key) {
    const int64_t B = check_inputs(weights, indices, offsets, psw);
    const int64_t T = num_tables(), total_width = col_offsets_[T];
    TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.dim() == 2 &&
                    grad.size(0) == B && grad.size(1) == total_width,
                "cpu_tbe: grad must be contiguous fp32 [B, total width]");
    TORCH_CHECK(kind >= SGD && kind <= ADAM, "cpu_tbe: unknown optimizer code");
    float* S1 = state_ptr(state1, kind == ADAGRAD || kind == ADAM, weight_offsets_[T], "state1");
    float* S2 = state_ptr(state2, kind == ADAM, weight_offsets_[T], "state2");
    float* RS = state_ptr(row_state, kind == ROWWISE_ADAGRAD, row_offsets_[T], "row_state");
    const int64_t* off = offsets.data_ptr<int64_t>();
    const int64_t N = off[T * B] - off[0];
    if (N <= 0) return;
    TORCH_CHECK(N < int64_t(UINT32_MAX), "cpu_tbe: more than 2^32 ids in one batch");
    std::lock_guard<std::mutex> lock(mutex_);  // the workspace is the kernel's own
    offsets_ptr_ = off;
    base_ = off[0];
    sort_by_row(indices, offsets, B);
    const float* pw = psw.has_value() ? psw->data_ptr<float>() : nullptr;
    const int64_t base = off[0];
    with_store(weights.scalar_type(), stochastic, uint32_t(rounding_key), [&](auto store) {
      using Store = decltype(store);
      Update<Store> u{reinterpret_cast<typename Store::type*>(weights.data_ptr()), store, S1, S2, RS,
                      grad.data_ptr<float>(), pw, total_width, kind, float(lr), float(eps), float(1.0 - beta1),
                      float(1.0 - beta2), float(l2), float(step_size)};
      at::parallel_for(0, N, UPDATE_GRAIN_IDS, [&](int64_t lo, int64_t hi) {
        std::vector<float> g(max_width_);
        update_range(u, base, lo, hi, B, g.data());
      });
    });
  }

 private:
  template <typename Store>
  struct Update {
    typename Store::type* W;
    Store store;
    float* S1;
    float* S2;
    float* RS;
    const float* grad;
    const float* pw;
    int64_t ld;
    int64_t kind;
    float lr, eps, one_minus_beta1, one_minus_beta2, l2, step_size;
  };

  int64_t check_inputs(const at::Tensor& weights, const at::Tensor& indices, const at::Tensor& offsets,
                       const c10::optional<at::Tensor>& psw) const {
    const int64_t T = num_tables();
    TORCH_CHECK(T > 0, "cpu_tbe: no tables");
    TORCH_CHECK(weights.device().is_cpu() && weights.is_contiguous() && weights.numel() == weight_offsets_[T],
                "cpu_tbe: weights must be one contiguous CPU buffer of all tables");  // dtype: with_store
    TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous() && indices.dim() == 1,
                "cpu_tbe: indices must be contiguous int64");
    TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.dim() == 1 &&
                    (offsets.numel() - 1) % T == 0,
                "cpu_tbe: offsets must be contiguous int64 of T * B + 1 values");
    const int64_t B = (offsets.numel() - 1) / T;
    const int64_t* off = offsets.data_ptr<int64_t>();
    TORCH_CHECK(off[0] >= 0 && off[T * B] <= indices.numel() && off[T * B] >= off[0],
                "cpu_tbe: offsets run past the indices");
    if (psw.has_value()) {
      TORCH_CHECK(psw->scalar_type() == at::kFloat && psw->is_contiguous() && psw->numel() == indices.numel(),
                  "cpu_tbe: per_sample_weights must be contiguous fp32 aligned with indices");
    }
    return B;
  }

  float* state_ptr(const c10::optional<at::Tensor>& s, bool needed, int64_t numel, const char* what) const {
    if (!needed) return nullptr;
    TORCH_CHECK(s.has_value() && s->scalar_type() == at::kFloat && s->is_contiguous() && s->numel() == numel,
                "cpu_tbe: ", what, " must be a contiguous fp32 buffer of ", numel, " values");
    return s->data_ptr<float>();
  }

  // Fills keys_/vals_ (positions relative to offsets[0]) with each table's ids sorted, and bag_of_.
  void sort_by_row(const at::Tensor& indices, const at::Tensor& offsets, int64_t B) {
    const int64_t T = num_tables();
    const int64_t* idx = indices.data_ptr<int64_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    const int64_t base = off[0], N = off[T * B] - base;
    if (int64_t(keys_.size()) < N) {  // grown once to the largest batch, then reused
      for (auto* v : {&keys_, &vals_, &keys_tmp_, &vals_tmp_, &bag_of_}) v->resize(N);
    }
    counts_.resize(std::max(1, at::get_num_threads()));
    std::atomic<bool> bad{false};
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      auto& counts = counts_[at::get_thread_num() % counts_.size()];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t lo = off[t * B] - base, hi = off[(t + 1) * B] - base;
        uint32_t max_key = 0;
        bool table_bad = false;
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t p = off[t * B + b] - base; p < off[t * B + b + 1] - base; ++p) {
            const uint64_t id = idx[base + p];
            table_bad |= id >= uint64_t(rows_[t]);
            keys_[p] = uint32_t(id);
            vals_[p] = uint32_t(p);
            bag_of_[p] = uint32_t(b);
            max_key = std::max(max_key, uint32_t(id));
          }
        }
        if (table_bad) {
          bad = true;
          continue;
        }
        sort_pairs(keys_.data() + lo, vals_.data() + lo, keys_tmp_.data() + lo, vals_tmp_.data() + lo, hi - lo,
                   max_key, counts);
      }
    });
    check_ids(bad);
  }

  // The runs that start among sorted positions [lo, hi): each row's gradient summed, then its update.
  template <typename Store>
  void update_range(const Update<Store>& u, int64_t base, int64_t lo, int64_t hi, int64_t B, float* g) const {
    // table_end(t): the end of table t's positions, relative to base
    auto table_end = [&](int64_t t) { return offsets_ptr_[(t + 1) * B] - base; };
    int64_t t = 0;
    while (table_end(t) <= lo) ++t;
    auto is_head = [&](int64_t p) { return p == offsets_ptr_[t * B] - base || keys_[p] != keys_[p - 1]; };
    int64_t p = lo;
    for (; p < hi; ++p) {  // the first run that starts here (the previous task finishes the one before)
      while (table_end(t) <= p) ++t;
      if (is_head(p)) break;
    }
    while (p < hi) {
      while (table_end(t) <= p) ++t;
      const int64_t tend = table_end(t);
      const uint32_t id = keys_[p];
      int64_t end = p + 1;
      while (end < tend && keys_[end] == id) ++end;
      update_row(u, t, id, p, end, tend, g);
      p = end;
    }
  }

  // The rows the id at sorted position q reads: its gradient row (random: bags come in row order) and,
  // at a run's head, the weight row and its state.
  template <typename Store>
  void prefetch_rows(const Update<Store>& u, int64_t t, int64_t q) const {
    const int64_t d = widths_[t], id = keys_[q], at = weight_offsets_[t] + id * d;
    const uint32_t pos = vals_[q];
    prefetch_read(u.grad + int64_t(bag_of_[pos]) * u.ld + col_offsets_[t], d);
    if (u.pw) __builtin_prefetch(u.pw + pos + base_, 0, 3);
    if (keys_[q - 1] == keys_[q]) return;  // q > 0 here; not a head: its row is prefetched already
    prefetch_write(u.W + at, d);
    if (u.S1) prefetch_write(u.S1 + at, d);
    if (u.S2) prefetch_write(u.S2 + at, d);
    if (u.RS) __builtin_prefetch(u.RS + row_offsets_[t] + id, 1, 3);
  }

  // One row: g = sum over its occurrences [p, end) of psw * grad[bag, table cols] (+ l2 * w), then the rule
  // of sharding.optim, with the same operations in the same association (a multiply then an add: the
  // extension is compiled with -ffp-contract=off), on the stored weight read as fp32; u.store writes the
  // result back (exactly as a float, or rounded to the half type).
  // tend: the end of table t's positions (what is prefetched, PREFETCH_AHEAD positions on, stays in it).
  template <typename Store>
  void update_row(const Update<Store>& u, int64_t t, uint32_t id, int64_t p, int64_t end, int64_t tend,
                  float* __restrict__ g) const {
    const int64_t d = widths_[t], c0 = col_offsets_[t];
    for (int64_t j = 0; j < d; ++j) g[j] = 0.0f;
    for (int64_t q = p; q < end; ++q) {
      if (q + PREFETCH_AHEAD < tend) prefetch_rows(u, t, q + PREFETCH_AHEAD);  // every position, once
      const uint32_t pos = vals_[q];
      const float* __restrict__ gr = u.grad + int64_t(bag_of_[pos]) * u.ld + c0;
      if (u.pw) {
        const float s = u.pw[pos + base_];
        for (int64_t j = 0; j < d; ++j) g[j] += s * gr[j];
      } else {
        for (int64_t j = 0; j < d; ++j) g[j] += gr[j];
      }
    }
    const int64_t at = weight_offsets_[t] + int64_t(id) * d;
    typename Store::type* __restrict__ w = u.W + at;
    const Store store = u.store;
    if (u.l2 != 0.0f) {
      for (int64_t j = 0; j < d; ++j) g[j] = g[j] + u.l2 * float(w[j]);
    }
    switch (u.kind) {
      case SGD: {
        const float step = -u.lr;
        for (int64_t j = 0; j < d; ++j) w[j] = store(float(w[j]) + step * g[j]);
        break;
      }
      case ADAGRAD: {
        float* __restrict__ s = u.S1 + at;
        const float step = -u.lr;
        for (int64_t j = 0; j < d; ++j) {
          s[j] += g[j] * g[j];
          w[j] = store(float(w[j]) + step * (g[j] / (std::sqrt(s[j]) + u.eps)));
        }
        break;
      }
      case ROWWISE_ADAGRAD: {
        float sq = 0.0f;
        for (int64_t j = 0; j < d; ++j) sq += g[j] * g[j];
        float& s = u.RS[row_offsets_[t] + id];
        s += sq / float(d);
        const float multiplier = u.lr / (std::sqrt(s) + u.eps);
        for (int64_t j = 0; j < d; ++j) w[j] = store(float(w[j]) - g[j] * multiplier);
        break;
      }
      default: {  // ADAM, lazy: only this row's moments move
        float* __restrict__ m = u.S1 + at;
        float* __restrict__ v = u.S2 + at;
        const float step = -u.step_size;
        for (int64_t j = 0; j < d; ++j) {
          m[j] = (g[j] - m[j]) * u.one_minus_beta1 + m[j];
          v[j] = (g[j] * g[j] - v[j]) * u.one_minus_beta2 + v[j];
          w[j] = store(float(w[j]) + step * (m[j] / (std::sqrt(v[j]) + u.eps)));
        }
      }
    }
  }

  std::vector<int64_t> rows_, widths_, weight_offsets_, row_offsets_, col_offsets_;
  int64_t max_width_ = 1;
  // Workspace of the backward in progress (under mutex_): sorted ids, their positions, bags of positions.
  std::vector<uint32_t> keys_, vals_, keys_tmp_, vals_tmp_, bag_of_;
  std::vector<std::vector<uint32_t>> counts_;  // per thread: the counting sort's histogram
  const int64_t* offsets_ptr_ = nullptr;
  int64_t base_ = 0;
  std::mutex mutex_;

};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "distrec's CPU table-batched embedding kernels (sharding/kernels/cpu_tbe.py wraps them)";
  m.def("advise_huge_pages", &advise_huge_pages, pybind11::arg("tensor"));
  m.def("round_into", &round_into, pybind11::arg("out"), pybind11::arg("src"), pybind11::arg("stochastic"),
        pybind11::arg("key"));
  m.attr("SGD") = int64_t(SGD);
  m.attr("ADAGRAD") = int64_t(ADAGRAD);
  m.attr("ROWWISE_ADAGRAD") = int64_t(ROWWISE_ADAGRAD);
  m.attr("ADAM") = int64_t(ADAM);
  pybind11::class_<Kernel>(m, "Kernel")
      .def(pybind11::init<std::vector<int64_t>, std::vector<int64_t>>(), pybind11::arg("rows"),
           pybind11::arg("widths"))
      .def("forward", &Kernel::forward, pybind11::arg("weights"), pybind11::arg("indices"),
           pybind11::arg("offsets"), pybind11::arg("per_sample_weights"),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("backward_update", &Kernel::backward_update, pybind11::arg("weights"), pybind11::arg("grad"),
           pybind11::arg("indices"), pybind11::arg("offsets"), pybind11::arg("per_sample_weights"),
           pybind11::arg("kind"), pybind11::arg("lr"), pybind11::arg("eps"), pybind11::arg("beta1"),
           pybind11::arg("beta2"), pybind11::arg("l2"), pybind11::arg("step_size"), pybind11::arg("state1"),
           pybind11::arg("state2"), pybind11::arg("row_state"), pybind11::arg("stochastic") = false,
           pybind11::arg("rounding_key") = 0, pybind11::call_guard<pybind11::gil_scoped_release>());
}
