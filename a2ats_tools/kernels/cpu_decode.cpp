// A²ATS decode step for one layer on the CPU, fused: score every cached row from the step's lookup table,
// keep sinks + window + the best rows by approximate score, optionally re-rank an over-fetched candidate set by
// exact logits, then attend exactly over the kept rows. One call per layer, in phases over every (sample, KV
// head) row, the passes over many rows split into spans so that threads share them evenly. The torch
// reference is A2atsSelector.select + kernels.sparse_attention.sparse_decode_torch (left-padded batches, a
// budget per sample); kernels/cpu_decode.py builds, loads and checks this file.
//
// Built with: g++ -O3 -march=native -fopenmp -shared -fPIC. Rows run on OpenMP threads: loaded into a process
// where torch already loaded its libgomp.so.1, the library shares torch's OpenMP runtime and thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Order-preserving map of a float32 to uint32: a > b (as floats) iff key(a) > key(b).
inline uint32_t order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Rows read at random from K/V (DRAM-sized buffers) are requested this many rows ahead of their use, so
// that several misses are in flight at once instead of one.
constexpr int64_t kAhead = 8;

inline void prefetch_row(const float* row, int64_t d) {
  for (int64_t i = 0; i < d; i += 16) __builtin_prefetch(row + i);
}

inline float dot(const float* a, const float* b, int64_t d) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

// Where a top-m selection cuts: keep every key above `key` and the first `ties` keys equal to it.
struct Cut {
  uint32_t key;
  int64_t ties;
  bool keeps(uint32_t k, int64_t& ties_left) const { return k > key || (k == key && ties_left-- > 0); }
};

// The cut keeping the m largest of `keys[0..n)`, whose values lie in [lo, hi], by radix select: each pass
// histograms the live range in at most 2048 bins (no data-dependent branches, unlike nth_element's
// partitioning) and narrows it to the bin holding the m-th largest; scores share their exponent, so
// bins follow the range actually used and two passes usually do.
Cut top_m_cut(const uint32_t* keys, int64_t n, int64_t m, uint32_t lo, uint32_t hi, std::vector<uint32_t>& scratch) {
  if (m <= 0) return {UINT32_MAX, 0};
  if (m >= n) return {0, n};
  const uint32_t* cur = keys;
  int64_t count = n;
  int64_t hist[2048];
  for (;;) {
    const uint32_t span = hi - lo;
    const int bits = span == 0 ? 0 : 32 - __builtin_clz(span);
    const int shift = std::max(0, bits - 11);
    const uint32_t bins = (span >> shift) + 1;
    std::fill(hist, hist + bins, 0);
    for (int64_t i = 0; i < count; ++i) hist[(cur[i] - lo) >> shift]++;
    uint32_t bin = bins - 1;
    for (; hist[bin] < m; --bin) m -= hist[bin];  // from the top: the bin holding the m-th largest
    if (shift == 0) return {lo + bin, m};
    const uint32_t new_lo = lo + (bin << shift);
    const uint32_t new_hi = std::min<uint64_t>(hi, static_cast<uint64_t>(new_lo) + ((1u << shift) - 1));
    scratch.resize(std::max<size_t>(scratch.size(), static_cast<size_t>(hist[bin])));
    int64_t kept = 0;  // keys of that bin, compacted (in place after the first pass)
    for (int64_t i = 0; i < count; ++i)
      if (cur[i] >= new_lo && cur[i] <= new_hi) scratch[kept++] = cur[i];
    cur = scratch.data();
    count = kept;
    lo = new_lo;
    hi = new_hi;
  }
}

typedef float v8 __attribute__((vector_size(32)));  // GCC/Clang vector: AVX registers where the CPU has them

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline v8 splat(float c) { return v8{c, c, c, c, c, c, c, c}; }

typedef int32_t i8v __attribute__((vector_size(32)));

// exp of 8 floats (Cephes' expf: x = n ln 2 + r, a degree-6 polynomial in r, times 2^n; within ~2 ulp of expf),
// 0 below -87.3 where expf goes subnormal. The group softmax over every cached row needs one per row and head.
inline v8 exp8(v8 x) {
  const i8v under = x < splat(-87.33654f);
  x = x > splat(88.72283f) ? splat(88.72283f) : x;
  x = under ? splat(0.0f) : x;
  const v8 n = (x * splat(1.44269504f) + splat(12582912.0f)) - splat(12582912.0f);  // round to nearest
  v8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8 y = splat(1.9875691500e-4f);
  y = y * r + splat(1.3981999507e-3f);
  y = y * r + splat(8.3334519073e-3f);
  y = y * r + splat(4.1665795894e-2f);
  y = y * r + splat(1.6666665459e-1f);
  y = y * r + splat(5.0000001201e-1f);
  y = y * r * r + r + splat(1.0f);
  const i8v bits = (__builtin_convertvector(n, i8v) + 127) << 23;
  v8 pow2;
  std::memcpy(&pow2, &bits, sizeof pow2);  // 2^n: the exponent bits, reinterpreted
  const v8 out = y * pow2;
  return under ? splat(0.0f) : out;
}

// x[i] = exp(x[i] - shift) for i < n; returns their sum.
inline float exp_shifted(float* x, int64_t n, float shift) {
  v8 acc = splat(0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8 e = exp8(load8(x + i) - splat(shift));
    std::memcpy(x + i, &e, sizeof e);
    acc += e;
  }
  float total = 0.0f;
  for (int l = 0; l < 8; ++l) total += acc[l];
  for (; i < n; ++i) total += (x[i] = std::exp(x[i] - shift));
  return total;
}

// acc[r] = rows[r] . (16 codes of one tile) for RB rows. A tile is the codebook's 16 codes side by side per
// dimension, [d, 16]: 4 KB read front to back (a [d, C] layout would stride 16 KB per dimension, every load
// landing in the same L1 set). Each codebook load feeds RB FMAs per half.
template <int RB>
inline void tile_product(const float* rows, const float* tile, int64_t d, v8 (&acc)[RB][2]) {
  for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = v8{};
  for (int64_t i = 0; i < d; ++i) {
    const v8 lo = load8(tile + i * 16), hi = load8(tile + i * 16 + 8);
    for (int r = 0; r < RB; ++r) {
      const float x = rows[r * d + i];
      acc[r][0] += lo * x;
      acc[r][1] += hi * x;
    }
  }
}

// out[r, c..c+16) = rows[r] . codebook[c..c+16) for RB rows (`tiles`: the codebook in 16-code tiles).
template <int RB>
inline void table_tile(const float* rows, const float* tiles, float* out, int64_t d, int64_t c_count, int64_t c) {
  v8 acc[RB][2];
  tile_product<RB>(rows, tiles + c * d, d, acc);
  for (int r = 0; r < RB; ++r) {
    std::memcpy(out + r * c_count + c, &acc[r][0], sizeof(v8));
    std::memcpy(out + r * c_count + c + 8, &acc[r][1], sizeof(v8));
  }
}

// Score tables of one KV head for codes [c0, c1) (multiples of 16): table[r, c] = rows[r] . codebook[c], where
// rows [R, d] are the step's queries rotated to each bucket centre (R = B * P) and tiles the codebook in
// 16-code tiles. Six rows at a time keep 12 accumulators in registers: each codebook load feeds 6 FMAs.
void score_tables(const float* rows, const float* tiles, float* table, int64_t r_count, int64_t d, int64_t c_count,
                  int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; c += 16) {
    int64_t r = 0;
    for (; r + 6 <= r_count; r += 6) table_tile<6>(rows + r * d, tiles, table + r * c_count, d, c_count, c);
    switch (r_count - r) {
      case 5: table_tile<5>(rows + r * d, tiles, table + r * c_count, d, c_count, c); break;
      case 4: table_tile<4>(rows + r * d, tiles, table + r * c_count, d, c_count, c); break;
      case 3: table_tile<3>(rows + r * d, tiles, table + r * c_count, d, c_count, c); break;
      case 2: table_tile<2>(rows + r * d, tiles, table + r * c_count, d, c_count, c); break;
      case 1: table_tile<1>(rows + r * d, tiles, table + r * c_count, d, c_count, c); break;
      default: break;
    }
  }
}

// Nearest centroids of RB keys: argmax_c keys[r] . weight[:, c] + bias[c] over all C codes (16 at a time from
// the tiles), the running best kept per lane in registers; ties keep the lowest code, as torch's argmax does.
template <int RB>
void encode_rows(const float* keys, const float* tiles, const float* bias, int64_t d, int64_t c_count, int16_t* out) {
  v8 best[RB][2];
  i8v best_code[RB][2];
  const i8v lane = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int r = 0; r < RB; ++r)
    for (int h = 0; h < 2; ++h) best[r][h] = v8{} - INFINITY, best_code[r][h] = i8v{};
  for (int64_t c = 0; c < c_count; c += 16) {
    v8 acc[RB][2];
    tile_product<RB>(keys, tiles + c * d, d, acc);
    const v8 bias_lo = load8(bias + c), bias_hi = load8(bias + c + 8);
    const i8v code_lo = lane + static_cast<int32_t>(c), code_hi = code_lo + 8;
    for (int r = 0; r < RB; ++r) {
      const v8 s0 = acc[r][0] + bias_lo, s1 = acc[r][1] + bias_hi;
      const i8v m0 = s0 > best[r][0], m1 = s1 > best[r][1];
      best[r][0] = m0 ? s0 : best[r][0];
      best[r][1] = m1 ? s1 : best[r][1];
      best_code[r][0] = m0 ? code_lo : best_code[r][0];
      best_code[r][1] = m1 ? code_hi : best_code[r][1];
    }
  }
  for (int r = 0; r < RB; ++r) {
    float value = -INFINITY;
    int32_t code = 0;
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 8; ++l) {
        const float v = best[r][h][l];
        const int32_t k = best_code[r][h][l];
        if (v > value || (v == value && k < code)) value = v, code = k;
      }
    out[r] = static_cast<int16_t>(code);
  }
}

struct Problem {
  int64_t hkv;  // KV heads: row r is sample r / hkv, KV head r % hkv
  const float* table;  // [Hkv, B, G', P, C]: this step's score tables (written by score_tables)
  int64_t table_sb, table_sh;  // strides (elements) of the sample and KV-head dimensions
  int64_t heads, head_stride;  // G' tables per (sample, KV head): 1 (the group's summed query) or G, P * C apart
  int approx_aggregation;      // how the G' approximate scores of a row aggregate: 0 sum (G' = 1), 1 max, 2 softmax
  const int16_t* codes;
  int64_t codes_sb, codes_sh;
  const int64_t* offsets;  // [N]: bucket(t - j) * C
  const float* q;          // [B*Hkv, G, d]
  const float* keys;       // [B, Hkv, cap, d] with strides kv_sb, kv_sh (values likewise)
  const float* values;
  int64_t kv_sb, kv_sh;
  int64_t group, d, n, n_sink, window;
  const int64_t* first;  // [B]: each sample's first real row (rows before it are left padding, never kept)
  const int64_t* top;    // [B]: each sample's top-K
  double rerank;         // over-fetch factor (0: no re-rank)
  int aggregation;  // 0 sum, 1 max, 2 softmax
  float scale;
  float* out;        // [B*Hkv, G, d]
  int64_t* picked;   // [B*Hkv, k]: kept rows ascending, then -1
  int64_t k;
  int64_t c_count;  // codes per codebook: a code outside [0, C) is clamped and reported, never read past
};

// A step's rows split into phases so that every thread gets an equal share even when the rows are fewer than
// the threads or do not divide among them (batch 1: 3 KV heads on 2 threads): the passes over every middle row
// and over the candidates' keys and values run over spans of rows of every (sample, KV head); the cuts, which
// need a whole row, run per row. Barriers separate the phases.
constexpr int64_t kScoreSpan = 16384;  // middle rows per scoring work item
constexpr int64_t kRowSpan = 256;      // candidates (or kept rows) per exact-logit and attention work item

struct RowWork {
  int64_t start = 0, sink_end = 0, win_start = 0, mid = 0, top = 0, fetch = 0;
  std::vector<uint32_t> approx;  // order keys of the middle rows' approximate scores
  std::vector<uint32_t> span_lo, span_hi;  // their range per scoring span
  std::vector<int64_t> cand;  // candidates in ascending row order: sinks, chosen middle rows, window
  std::vector<char> is_forced;
  std::vector<float> logits;  // [G, nc]: exact logits of every candidate
  std::vector<int64_t> keep;  // positions into cand of the kept rows, ascending
  std::vector<float> partial;  // [spans of keep, G, 2 + d]: each span's softmax max, sum and weighted values
  std::vector<char> bad_code;  // per scoring span: a code outside [0, C) was read
};

// A code as a table column: clamped into [0, C) so that no table is read out of bounds, `bad` set if it was not.
inline int64_t column(int16_t code, int64_t c_count, bool& bad) {
  const int64_t c = static_cast<uint16_t>(code);  // negative codes become >= 32768 >= C
  bad |= c >= c_count;
  return std::min(c, c_count - 1);
}

inline int64_t spans(int64_t count, int64_t span) { return (count + span - 1) / span; }

void plan_row(const Problem& p, int64_t row, RowWork& w) {
  const int64_t n = p.n, sb = row / p.hkv;
  w.start = std::min(p.first[sb], n);
  w.top = p.top[sb];
  w.sink_end = std::min(w.start + p.n_sink, n);
  w.win_start = std::max(n - p.window, w.sink_end);
  w.mid = w.win_start - w.sink_end;
  w.fetch = p.rerank > 0 ? static_cast<int64_t>(std::ceil(static_cast<double>(w.top) * p.rerank)) : 0;
  w.approx.resize(w.mid);
  const int64_t s = p.approx_aggregation == 2 ? 1 : spans(w.mid, kScoreSpan);
  w.span_lo.assign(s, UINT32_MAX);
  w.span_hi.assign(s, 0);
  w.bad_code.assign(s, 0);
}

// 1a. Approximate scores of middle rows [j0, j1) of a row (aggregation sum or max; softmax needs the whole row).
void score_span(const Problem& p, int64_t row, RowWork& w, int64_t span) {
  const int64_t sb = row / p.hkv, sh = row % p.hkv;
  const float* table = p.table + sb * p.table_sb + sh * p.table_sh;
  const int16_t* codes = p.codes + sb * p.codes_sb + sh * p.codes_sh;
  const int64_t j0 = span * kScoreSpan, j1 = std::min(w.mid, j0 + kScoreSpan), base = w.sink_end;
  uint32_t lo = UINT32_MAX, hi = 0;
  bool bad = false;
  uint32_t* approx = w.approx.data();
  if (p.heads == 1) {  // sum (the group's one table: the default), or max with G = 1
    for (int64_t j = j0; j < j1; ++j) {
      const uint32_t key = order_key(table[p.offsets[base + j] + column(codes[base + j], p.c_count, bad)]);
      approx[j] = key;
      lo = std::min(lo, key);
      hi = std::max(hi, key);
    }
  } else {
    const int64_t hs = p.head_stride;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t at = p.offsets[base + j] + column(codes[base + j], p.c_count, bad);
      float score = table[at];
      for (int64_t g = 1; g < p.heads; ++g) score = std::max(score, table[g * hs + at]);
      const uint32_t key = order_key(score);
      approx[j] = key;
      lo = std::min(lo, key);
      hi = std::max(hi, key);
    }
  }
  w.span_lo[span] = lo;
  w.span_hi[span] = hi;
  w.bad_code[span] = bad;
}

// 1a'. Approximate scores with aggregation softmax: each head's softmax over all n rows, summed over the group.
void score_softmax(const Problem& p, int64_t row, RowWork& w) {
  const int64_t n = p.n, sb = row / p.hkv, sh = row % p.hkv;
  const float* table = p.table + sb * p.table_sb + sh * p.table_sh;
  const int16_t* codes = p.codes + sb * p.codes_sb + sh * p.codes_sh;
  std::vector<float> probs(p.heads * n);
  bool bad = false;
  for (int64_t g = 0; g < p.heads; ++g) {
    float* x = probs.data() + g * n;
    float mx = -INFINITY;
    for (int64_t r = 0; r < n; ++r)
      mx = std::max(mx, x[r] = table[g * p.head_stride + p.offsets[r] + column(codes[r], p.c_count, bad)] * p.scale);
    const float inv = 1.0f / exp_shifted(x, n, mx);
    for (int64_t r = 0; r < n; ++r) x[r] *= inv;
  }
  uint32_t lo = UINT32_MAX, hi = 0;
  for (int64_t j = 0; j < w.mid; ++j) {
    float score = probs[w.sink_end + j];
    for (int64_t g = 1; g < p.heads; ++g) score += probs[g * n + w.sink_end + j];
    const uint32_t key = order_key(score);
    w.approx[j] = key;
    lo = std::min(lo, key);
    hi = std::max(hi, key);
  }
  w.span_lo[0] = lo;
  w.span_hi[0] = hi;
  w.bad_code[0] = bad;
}

// 1b. Where the top middle rows end, and the candidates in ascending row order.
void choose_candidates(const Problem& p, RowWork& w) {
  const int64_t n = p.n;
  uint32_t lo = UINT32_MAX, hi = 0;
  for (size_t s = 0; s < w.span_lo.size(); ++s) lo = std::min(lo, w.span_lo[s]), hi = std::max(hi, w.span_hi[s]);
  std::vector<uint32_t> scratch;
  const bool rerank = w.fetch > 0;
  const Cut cut = top_m_cut(w.approx.data(), w.mid, std::min(rerank ? w.fetch : w.top, w.mid), lo, hi, scratch);
  w.cand.clear();
  w.is_forced.clear();
  w.cand.reserve(n - w.start - w.mid + std::min(w.mid, rerank ? w.fetch : w.top));
  for (int64_t r = w.start; r < w.sink_end; ++r) w.cand.push_back(r), w.is_forced.push_back(1);
  int64_t ties = cut.ties;
  for (int64_t j = 0; j < w.mid; ++j)
    if (cut.keeps(w.approx[j], ties)) w.cand.push_back(w.sink_end + j), w.is_forced.push_back(0);
  for (int64_t r = w.win_start; r < n; ++r) w.cand.push_back(r), w.is_forced.push_back(1);
  w.logits.resize(p.group * w.cand.size());
}

// 2. Exact logits of candidates [c0, c1) for each query head of the group.
void candidate_logits(const Problem& p, int64_t row, RowWork& w, int64_t span) {
  const int64_t sb = row / p.hkv, sh = row % p.hkv, d = p.d, nc = static_cast<int64_t>(w.cand.size());
  const float* keys = p.keys + sb * p.kv_sb + sh * p.kv_sh;
  const float* q = p.q + row * p.group * d;
  const int64_t c0 = span * kRowSpan, c1 = std::min(nc, c0 + kRowSpan);
  for (int64_t c = c0; c < std::min(c1, c0 + kAhead); ++c) prefetch_row(keys + w.cand[c] * d, d);
  for (int64_t c = c0; c < c1; ++c) {
    if (c + kAhead < c1) prefetch_row(keys + w.cand[c + kAhead] * d, d);
    const float* key = keys + w.cand[c] * d;
    for (int64_t g = 0; g < p.group; ++g) w.logits[g * nc + c] = dot(q + g * d, key, d);
  }
}

// 3. Re-rank: keep the forced rows and the `top` best middle candidates by the aggregated exact score; write
// the kept rows out.
void rerank_candidates(const Problem& p, int64_t row, RowWork& w) {
  const int64_t nc = static_cast<int64_t>(w.cand.size()), g_count = p.group;
  const int64_t forced = p.n - w.start - w.mid;
  w.keep.clear();
  w.keep.reserve(p.k);
  if (w.fetch > 0 && nc - forced > w.top) {
    const float* logits = w.logits.data();
    std::vector<float> agg(nc, 0.0f);
    if (p.aggregation == 2) {  // each head's softmax over the candidates (vector exp: one per candidate and head)
      std::vector<float> e(nc);
      for (int64_t g = 0; g < g_count; ++g) {
        const float* lg = logits + g * nc;
        float mx = -INFINITY;
        for (int64_t c = 0; c < nc; ++c) mx = std::max(mx, e[c] = lg[c] * p.scale);
        const float inv = 1.0f / exp_shifted(e.data(), nc, mx);
        for (int64_t c = 0; c < nc; ++c) agg[c] += e[c] * inv;
      }
    } else {
      for (int64_t c = 0; c < nc; ++c) {
        float a = p.aggregation == 1 ? -INFINITY : 0.0f;
        for (int64_t g = 0; g < g_count; ++g) {
          const float v = logits[g * nc + c];
          a = p.aggregation == 1 ? std::max(a, v) : a + v;
        }
        agg[c] = a;
      }
    }
    std::vector<uint32_t> middle, scratch;
    uint32_t mlo = UINT32_MAX, mhi = 0;
    for (int64_t c = 0; c < nc; ++c) {
      if (w.is_forced[c]) continue;
      const uint32_t key = order_key(agg[c]);
      middle.push_back(key);
      mlo = std::min(mlo, key);
      mhi = std::max(mhi, key);
    }
    const Cut best = top_m_cut(middle.data(), static_cast<int64_t>(middle.size()), w.top, mlo, mhi, scratch);
    int64_t m = 0, left = best.ties;
    for (int64_t c = 0; c < nc; ++c)
      if (w.is_forced[c] || best.keeps(middle[m++], left)) w.keep.push_back(c);
  } else {
    for (int64_t c = 0; c < nc; ++c) w.keep.push_back(c);
  }
  const int64_t kept = static_cast<int64_t>(w.keep.size());
  int64_t* picked = p.picked + row * p.k;
  for (int64_t i = 0; i < p.k; ++i) picked[i] = i < kept ? w.cand[w.keep[i]] : -1;
  w.partial.resize(spans(kept, kRowSpan) * g_count * (2 + p.d));
}

// 4. Each query head's attention over kept rows [i0, i1): the span's softmax max, sum of weights and weighted
// sum of values, merged across spans in phase 5 (each value row is read once for the whole group).
void attend_span(const Problem& p, int64_t row, RowWork& w, int64_t span) {
  const int64_t sb = row / p.hkv, sh = row % p.hkv, d = p.d, g_count = p.group;
  const int64_t nc = static_cast<int64_t>(w.cand.size()), kept = static_cast<int64_t>(w.keep.size());
  const float* values = p.values + sb * p.kv_sb + sh * p.kv_sh;
  const int64_t i0 = span * kRowSpan, i1 = std::min(kept, i0 + kRowSpan);
  float* part = w.partial.data() + span * g_count * (2 + d);
  for (int64_t g = 0; g < g_count; ++g) {
    const float* lg = w.logits.data() + g * nc;
    float mx = -INFINITY;
    for (int64_t i = i0; i < i1; ++i) mx = std::max(mx, lg[w.keep[i]] * p.scale);
    float* slot = part + g * (2 + d);
    slot[0] = mx;
    slot[1] = 0.0f;
    std::fill(slot + 2, slot + 2 + d, 0.0f);
  }
  for (int64_t i = i0; i < std::min(i1, i0 + kAhead); ++i) prefetch_row(values + w.cand[w.keep[i]] * d, d);
  for (int64_t i = i0; i < i1; ++i) {
    if (i + kAhead < i1) prefetch_row(values + w.cand[w.keep[i + kAhead]] * d, d);
    const int64_t c = w.keep[i];
    const float* v = values + w.cand[c] * d;
    for (int64_t g = 0; g < g_count; ++g) {
      float* slot = part + g * (2 + d);
      const float wi = std::exp(w.logits[g * nc + c] * p.scale - slot[0]);
      slot[1] += wi;
      float* o = slot + 2;
#pragma omp simd
      for (int64_t e = 0; e < d; ++e) o[e] += wi * v[e];
    }
  }
}

// 5. The spans' partial attentions merged into each query head's output.
void merge_spans(const Problem& p, int64_t row, const RowWork& w) {
  const int64_t d = p.d, g_count = p.group, count = spans(static_cast<int64_t>(w.keep.size()), kRowSpan);
  for (int64_t g = 0; g < g_count; ++g) {
    float* o = p.out + (row * g_count + g) * d;
    std::fill(o, o + d, 0.0f);
    float mx = -INFINITY;
    for (int64_t s = 0; s < count; ++s) mx = std::max(mx, w.partial[(s * g_count + g) * (2 + d)]);
    float total = 0.0f;
    for (int64_t s = 0; s < count; ++s) {
      const float* slot = w.partial.data() + (s * g_count + g) * (2 + d);
      const float f = std::exp(slot[0] - mx);
      total += f * slot[1];
#pragma omp simd
      for (int64_t e = 0; e < d; ++e) o[e] += f * slot[2 + e];
    }
    if (count == 0) continue;
    const float inv = 1.0f / total;
    for (int64_t e = 0; e < d; ++e) o[e] *= inv;
  }
}

// Work items (row, span) of a phase that runs over spans of every row.
void span_items(std::vector<std::pair<int64_t, int64_t>>& items, const std::vector<RowWork>& work,
                int64_t (*count)(const RowWork&)) {
  items.clear();
  for (size_t r = 0; r < work.size(); ++r)
    for (int64_t s = 0; s < count(work[r]); ++s) items.emplace_back(static_cast<int64_t>(r), s);
}

// The scoring queries of sample b, KV head h: the group's RoPE'd queries q [G, d] taken back to pre-RoPE form
// with this step's cos/sin, summed over the group (`fold`, for aggregation=sum) or not, then rotated to each
// bucket centre (bucket_cos/sin [P, d]) -> rows [G', P, d]. The same operations, in the same order and without
// fused multiply-adds, as the torch path (rope.undo_rope, sum, rope.apply_rope), so both score with the same
// tables.
__attribute__((optimize("fp-contract=off"))) void scoring_queries(const float* q, const float* cos, const float* sin,
                                                                   const float* bucket_cos, const float* bucket_sin,
                                                                   int64_t group, bool fold, int64_t buckets,
                                                                   int64_t d, float* rows) {
  const int64_t half = d / 2;
  std::vector<float> folded(d, 0.0f);
  for (int64_t head = 0; head < (fold ? 1 : group); ++head) {
    const int64_t g_first = fold ? 0 : head, g_end = fold ? group : head + 1;  // the query heads of this row
    for (int64_t g = g_first; g < g_end; ++g) {
      const float* x = q + g * d;
      for (int64_t i = 0; i < d; ++i) {
        const float rotated_half = i < half ? -x[i + half] : x[i - half];
        float scale2 = cos[i] * cos[i] + sin[i] * sin[i];
        scale2 = std::max(scale2, 1e-12f);
        const float pre = (x[i] * cos[i] - rotated_half * sin[i]) / scale2;
        folded[i] = g == g_first ? pre : folded[i] + pre;
      }
    }
    float* out = rows + head * buckets * d;
    for (int64_t b = 0; b < buckets; ++b) {
      const float* c = bucket_cos + b * d;
      const float* s = bucket_sin + b * d;
      for (int64_t i = 0; i < d; ++i) {
        const float rotated_half = i < half ? -folded[i + half] : folded[i - half];
        out[b * d + i] = folded[i] * c[i] + rotated_half * s[i];
      }
    }
  }
}

}  // namespace

// One layer's decode step. q [B, Hq, d]: the step's RoPE'd queries; cos/sin [B, d]: the step's rotary
// factors; bucket_cos/sin [P, d]: those of the bucket centres in use; tiles [Hkv, C/16, d, 16]: the codebooks
// in 16-code tiles; rows [Hkv, B*G'*P, d] and table [Hkv, B*G'*P, C]: scratch for the scoring queries and
// tables, G' = 1 for approx_aggregation 0 (sum: one table of the group's summed query), else G. Returns 0, or 2
// where a scored row's code lies outside [0, C) (read clamped: no table is read out of bounds). rows_read: the
// K/V rows the step read (every candidate's key, every kept row's value), for the cache's traffic count.
extern "C" int a2ats_cpu_decode(int64_t batch, int64_t hkv, int64_t buckets, int approx_aggregation,
                                int64_t c_count, const float* cos,
                                const float* sin, const float* bucket_cos, const float* bucket_sin, float* rows,
                                const float* tiles, float* table, const int16_t* codes, int64_t codes_sb,
                                int64_t codes_sh, const int64_t* offsets, const float* q, const float* keys,
                                const float* values, int64_t kv_sb, int64_t kv_sh, int64_t group, int64_t d,
                                int64_t n, int64_t n_sink, int64_t window, const int64_t* first, const int64_t* top,
                                double rerank, int aggregation, float scale, float* out, int64_t* picked, int64_t k,
                                int64_t* rows_read, int threads) {
  const bool fold = approx_aggregation == 0;
  const int64_t heads = fold ? 1 : group, per_sample = heads * buckets, r_count = batch * per_sample;
  Problem p{hkv, table, per_sample * c_count, r_count * c_count, heads, buckets * c_count, approx_aggregation,
            codes, codes_sb, codes_sh, offsets, q, keys, values, kv_sb, kv_sh, group, d, n, n_sink, window, first,
            top, rerank, aggregation, scale, out, picked, k, c_count};
  const int64_t rows_total = batch * hkv;
  std::vector<RowWork> work(rows_total);
  std::vector<std::pair<int64_t, int64_t>> items;
  threads = static_cast<int>(std::max<int64_t>(1, threads));
  constexpr int64_t kCodeBlock = 256;  // codes per table work item
  const int64_t blocks = (c_count + kCodeBlock - 1) / kCodeBlock;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows_total; ++r) {
      const int64_t b = r / hkv, h = r % hkv;
      scoring_queries(q + r * group * d, cos + b * d, sin + b * d, bucket_cos, bucket_sin, group, fold, buckets, d,
                      rows + (h * batch + b) * per_sample * d);
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < hkv * blocks; ++item) {
      const int64_t h = item / blocks, c0 = (item % blocks) * kCodeBlock;
      score_tables(rows + h * r_count * d, tiles + h * d * c_count, table + h * r_count * c_count, r_count, d, c_count,
                   c0, std::min(c_count, c0 + kCodeBlock));
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows_total; ++r) plan_row(p, r, work[r]);
#pragma omp single
    span_items(items, work, [](const RowWork& w) { return static_cast<int64_t>(w.span_lo.size()); });
#pragma omp for schedule(dynamic)
    for (size_t i = 0; i < items.size(); ++i) {
      const auto [r, s] = items[i];
      if (approx_aggregation == 2) score_softmax(p, r, work[r]);
      else score_span(p, r, work[r], s);
    }
#pragma omp for schedule(dynamic)
    for (int64_t r = 0; r < rows_total; ++r) choose_candidates(p, work[r]);
#pragma omp single
    span_items(items, work, [](const RowWork& w) { return spans(static_cast<int64_t>(w.cand.size()), kRowSpan); });
#pragma omp for schedule(dynamic)
    for (size_t i = 0; i < items.size(); ++i) candidate_logits(p, items[i].first, work[items[i].first], items[i].second);
#pragma omp for schedule(dynamic)
    for (int64_t r = 0; r < rows_total; ++r) rerank_candidates(p, r, work[r]);
#pragma omp single
    span_items(items, work, [](const RowWork& w) { return spans(static_cast<int64_t>(w.keep.size()), kRowSpan); });
#pragma omp for schedule(dynamic)
    for (size_t i = 0; i < items.size(); ++i) attend_span(p, items[i].first, work[items[i].first], items[i].second);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows_total; ++r) merge_spans(p, r, work[r]);
  }
  int64_t read = 0;  // K rows of every candidate and V rows of every kept row
  for (const RowWork& w : work) read += static_cast<int64_t>(w.cand.size() + w.keep.size());
  *rows_read = read;
  for (const RowWork& w : work)
    for (char bad : w.bad_code)
      if (bad) return 2;  // a code outside [0, C): the caller refuses the step
  return 0;
}

// Codes of m keys per KV head: keys [Hkv, m, d] (pre-RoPE), tiles [Hkv, C/16, d, 16] of the encode weight
// (whitening times whitened centroids), bias [Hkv, C] (minus half their squared norms) -> codes [Hkv, m].
extern "C" int a2ats_cpu_encode(int64_t hkv, int64_t m, int64_t d, int64_t c_count, const float* keys,
                                const float* tiles, const float* bias, int16_t* codes, int threads) {
  constexpr int64_t kRows = 6;
  const int64_t blocks = (m + kRows - 1) / kRows;
  threads = static_cast<int>(std::max<int64_t>(1, threads));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t item = 0; item < hkv * blocks; ++item) {
    const int64_t h = item / blocks, r0 = (item % blocks) * kRows;
    const float* k = keys + (h * m + r0) * d;
    const float* t = tiles + h * c_count * d;
    const float* b = bias + h * c_count;
    int16_t* out = codes + h * m + r0;
    switch (std::min(kRows, m - r0)) {
      case 6: encode_rows<6>(k, t, b, d, c_count, out); break;
      case 5: encode_rows<5>(k, t, b, d, c_count, out); break;
      case 4: encode_rows<4>(k, t, b, d, c_count, out); break;
      case 3: encode_rows<3>(k, t, b, d, c_count, out); break;
      case 2: encode_rows<2>(k, t, b, d, c_count, out); break;
      default: encode_rows<1>(k, t, b, d, c_count, out); break;
    }
  }
  return 0;
}
