// Bidirectional attention for XLA's CPU backend as XLA FFI custom calls: forward and backward,
// each also with dropout on the probabilities.
//
// Built with layer_norm.cc into one library on first use by gemsjax/models/native_kernels.py
// (c++ -O3 -march=native) and called through jax.ffi. Same function as
// gemsjax.models.backend.attend, on float32 q: [B, Lq, N, D], k, v: [B, Lk, N, D],
// keep: bool[B, Lk] (the scale already folded into q):
//   out = dropout(softmax(where(keep, q k^T, FLT_MIN))) v   per (row, head) pair,
// the dropout given as its keep mask kept: bool[B, N, Lq, Lk] and scale 1 / (1 - rate).
// Each work item takes one (row, head) pair and walks its queries in blocks of 64, keeping a
// block's [64, Lk] scores in the core's cache; the backward pass recomputes the probabilities
// instead of reading them back. Items are spread over XLA's intra-op thread pool. Matmuls run on
// a register-blocked kernel written with GCC vector extensions: 16-float vectors on AVX-512,
// 8-float vectors on AVX2 + FMA.

#include <cmath>
#include <cfloat>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t QBLOCK = 64; // query rows per block

// exp(x) for x <= 0 (Cephes expf's range reduction and polynomial, ~1 ulp); exactly 0 where
// float32 exp underflows.
inline vf exp_nonpositive(vf x) {
  const vf lo = splat(-87.33654f);
  vf xc = x < lo ? lo : x;
  vf t = xc * 1.44269504088896341f;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: rounds to the nearest integer
  vf n = (t + magic) - magic;
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf result = p * reinterpret_cast<vf>(bits);
  return x < lo ? splat(0.0f) : result;
}

// Rows [0, R) of C (+)= A B: A's (r, k) at a[r*ras + k*cas], packed first; B and C as in `tile`.
template <int R>
void row_block(int64_t N, int64_t K, const float* a, int64_t ras, int64_t cas, const float* b,
               int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  thread_local std::vector<float> panel;
  panel.resize(K * R);
  float* pp = panel.data();
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r) pp[k * R + r] = a[r * ras + k * cas];
  int64_t j = 0;
  if constexpr (VECTORS >= 3)
    for (; j + 3 * W <= N; j += 3 * W) tile<R, 3>(K, pp, b + j, ldb, c + j, ldc, accumulate);
  for (; j + 2 * W <= N; j += 2 * W) tile<R, 2>(K, pp, b + j, ldb, c + j, ldc, accumulate);
  for (; j + W <= N; j += W) tile<R, 1>(K, pp, b + j, ldb, c + j, ldc, accumulate);
  for (; j < N; ++j)
    for (int r = 0; r < R; ++r) {
      float sum = accumulate ? c[r * ldc + j] : 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += pp[k * R + r] * b[k * ldb + j];
      c[r * ldc + j] = sum;
    }
}

// C[M, N] (+)= A[M, K] B[K, N]; A's (i, k) at a[i*ras + k*cas], B's row k at b + k*ldb, C's
// rows ldc apart. Rows go in register tiles of ROWS, then 4, then the last 1-3; with 6-row tiles
// a last 1 or 2 rows (a head of 32: 5 x 6 + 2) take one 6-row block along as 4 + 3 or 4 + 4,
// since a 1-row tile loads a B vector per FMA.
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ras, int64_t cas,
          const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t blocks = M / ROWS;
  if (ROWS == 6 && blocks > 0 && M % ROWS <= 2 && M % ROWS > 0) --blocks;
  int64_t i = 0;
  for (; i < blocks * ROWS; i += ROWS)
    row_block<ROWS>(N, K, a + i * ras, ras, cas, b, ldb, c + i * ldc, ldc, accumulate);
  for (; i + 4 <= M; i += 4)
    row_block<4>(N, K, a + i * ras, ras, cas, b, ldb, c + i * ldc, ldc, accumulate);
  const float* rest_a = a + i * ras;
  float* rest_c = c + i * ldc;
  switch (M - i) {
    case 3: row_block<3>(N, K, rest_a, ras, cas, b, ldb, rest_c, ldc, accumulate); break;
    case 2: row_block<2>(N, K, rest_a, ras, cas, b, ldb, rest_c, ldc, accumulate); break;
    case 1: row_block<1>(N, K, rest_a, ras, cas, b, ldb, rest_c, ldc, accumulate); break;
  }
}

// dst[D, L] = src[L, D] with src's rows `stride` floats apart (in blocks of W rows).
void transpose(const float* src, int64_t L, int64_t D, int64_t stride, float* dst) {
  for (int64_t l0 = 0; l0 < L; l0 += W) {
    const int64_t l1 = std::min(L, l0 + W);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t l = l0; l < l1; ++l) dst[d * L + l] = src[l * stride + d];
  }
}

// dst[L, D] (rows `stride` floats apart) = src[D, L]^T.
void untranspose(const float* src, int64_t L, int64_t D, int64_t stride, float* dst) {
  for (int64_t l0 = 0; l0 < L; l0 += W) {
    const int64_t l1 = std::min(L, l0 + W);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t l = l0; l < l1; ++l) dst[l * stride + d] = src[d * L + l];
  }
}

// keep_mask[L] <- -1 where keep, else 0 (the lane condition of the vector selects below).
void keep_lanes(const bool* keep, int64_t L, std::vector<int32_t>& keep_mask) {
  keep_mask.resize(L);
  for (int64_t j = 0; j < L; ++j) keep_mask[j] = keep[j] ? -1 : 0;
}

inline vi load_lanes(const int32_t* p) { return *reinterpret_cast<const vi*>(p); }

// scores[rows, L] <- exp(where(keep, scores, FLT_MIN) - row max), inverse[rows] <- 1 / row sum
// (softmax = scores * inverse; keep as from keep_lanes).
void exp_rows(float* scores, int64_t rows, int64_t L, const int32_t* keep, float* inverse) {
  const int64_t full = L - L % W;
  const vf lowest = splat(-FLT_MAX);
  for (int64_t i = 0; i < rows; ++i) {
    float* s = scores + i * L;
    vf peaks = lowest;
    for (int64_t j = 0; j < full; j += W) {
      vf x = load_lanes(keep + j) != 0 ? load(s + j) : lowest;
      store(s + j, x);
      peaks = x > peaks ? x : peaks;
    }
    float peak = -FLT_MAX;
    for (int v = 0; v < W; ++v) peak = std::max(peak, peaks[v]);
    for (int64_t j = full; j < L; ++j) {
      s[j] = keep[j] ? s[j] : -FLT_MAX;
      peak = std::max(peak, s[j]);
    }
    vf sums{};
    for (int64_t j = 0; j < full; j += W) {
      vf e = exp_nonpositive(load(s + j) - peak);
      store(s + j, e);
      sums += e;
    }
    float total = 0.0f;
    for (int v = 0; v < W; ++v) total += sums[v];
    for (int64_t j = full; j < L; ++j) total += s[j] = std::exp(s[j] - peak);
    inverse[i] = 1.0f / total;
  }
}

// d_scores[rows, L] <- probs * (d_probs - sum_j probs * d_probs) where keep, else 0: the
// softmax's backward pass, with probs = exps * inverse (exps, inverse as from exp_rows) and
// d_probs = d_scores * d_scale on entry.
void softmax_backward_rows(const float* exps, const float* inverse, float* d_scores, int64_t rows,
                           int64_t L, const int32_t* keep, float d_scale) {
  const int64_t full = L - L % W;
  for (int64_t i = 0; i < rows; ++i) {
    const float* e = exps + i * L;
    float* d = d_scores + i * L;
    vf sums{};
    for (int64_t j = 0; j < full; j += W) sums += load(e + j) * load(d + j);
    float dot = 0.0f;
    for (int v = 0; v < W; ++v) dot += sums[v];
    for (int64_t j = full; j < L; ++j) dot += e[j] * d[j];
    // d_probs is d_scores * d_scale; probs = exps * inverse.
    const float scale = inverse[i] * d_scale, delta = dot * inverse[i];
    for (int64_t j = 0; j < full; j += W)
      store(d + j, load_lanes(keep + j) != 0 ? load(e + j) * ((load(d + j) - delta) * scale) : vf{});
    for (int64_t j = full; j < L; ++j) d[j] = keep[j] ? e[j] * ((d[j] - delta) * scale) : 0.0f;
  }
}

// dst[rows, L] <- src * kept (kept: bool[rows, L], the dropout's keep mask).
void apply_kept(const float* src, const bool* kept, int64_t rows, int64_t L, float* dst) {
  const int64_t full = L - L % W;
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = src + i * L;
    const bool* m = kept + i * L;
    float* d = dst + i * L;
    for (int64_t j = 0; j < full; j += W) {
      vi lanes = __builtin_convertvector(*reinterpret_cast<const vb*>(m + j), vi);
      store(d + j, lanes != 0 ? load(s + j) : vf{});
    }
    for (int64_t j = full; j < L; ++j) d[j] = m[j] ? s[j] : 0.0f;
  }
}

struct Shape {
  int64_t rows, len_q, len_k, heads, depth;
};

ffi::Error check(const Shape& s, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                 ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::PRED>& keep) {
  auto dq = q.dimensions(), dk = k.dimensions(), dv = v.dimensions(), dm = keep.dimensions();
  if (dq.size() != 4 || dk.size() != 4 || dv.size() != 4 || dm.size() != 2)
    return ffi::Error::InvalidArgument("attention: q, k, v must be [B, L, N, D], keep [B, Lk]");
  for (int i : {0, 2, 3})
    if (dk[i] != dq[i] || dv[i] != dq[i])
      return ffi::Error::InvalidArgument("attention: q, k, v disagree on B, N or D");
  if (dv[1] != dk[1] || dm[0] != s.rows || dm[1] != s.len_k)
    return ffi::Error::InvalidArgument("attention: k, v and keep disagree on B or Lk");
  return ffi::Error::Success();
}

Shape shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto dq = q.dimensions();
  return Shape{dq[0], dq[1], k.dimensions()[1], dq[2], dq[3]};
}

// The forward pass; with `kept` (bool[B, N, Lq, Lk], or null) the probabilities are dropped
// where it is false and the rest multiplied by `scale` (dropout).
ffi::Error forward_pass(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                        ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::PRED>& keep, const bool* kept,
                        float scale, ffi::Result<ffi::Buffer<ffi::F32>>& out) {
  const Shape s = shape_of(q, k);
  if (ffi::Error e = check(s, q, k, v, keep); e.failure()) return e;
  const int64_t stride = s.heads * s.depth;  // between positions of one (row, head) pair
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* keep_all = keep.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, s.rows * s.heads, [&](int64_t pair) {
    const int64_t b = pair / s.heads, n = pair % s.heads;
    thread_local std::vector<float> k_t, scores, inverse;
    thread_local std::vector<int32_t> keep_mask;
    k_t.resize(s.depth * s.len_k);
    scores.resize(QBLOCK * s.len_k);
    inverse.resize(QBLOCK);
    keep_lanes(keep_all + b * s.len_k, s.len_k, keep_mask);
    const int64_t k_off = b * s.len_k * stride + n * s.depth;
    transpose(kp + k_off, s.len_k, s.depth, stride, k_t.data());
    for (int64_t first = 0; first < s.len_q; first += QBLOCK) {
      const int64_t count = std::min(QBLOCK, s.len_q - first);
      const int64_t q_off = (b * s.len_q + first) * stride + n * s.depth;
      gemm(count, s.len_k, s.depth, qp + q_off, stride, 1, k_t.data(), s.len_k, scores.data(),
           s.len_k, false);
      exp_rows(scores.data(), count, s.len_k, keep_mask.data(), inverse.data());
      if (kept != nullptr)
        apply_kept(scores.data(), kept + (pair * s.len_q + first) * s.len_k, count, s.len_k,
                   scores.data());
      float* o = op + q_off;
      gemm(count, s.depth, s.len_k, scores.data(), s.len_k, 1, vp + k_off, stride, o, stride,
           false);
      for (int64_t i = 0; i < count; ++i)
        for (int64_t d = 0; d < s.depth; ++d) o[i * stride + d] *= inverse[i] * scale;
    }
  });
  return ffi::Error::Success();
}

// The backward pass of forward_pass (same `kept` and `scale`).
ffi::Error backward_pass(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                         ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::PRED>& keep, const bool* kept,
                         float scale, ffi::Buffer<ffi::F32>& d_out,
                         ffi::Result<ffi::Buffer<ffi::F32>>& d_q,
                         ffi::Result<ffi::Buffer<ffi::F32>>& d_k,
                         ffi::Result<ffi::Buffer<ffi::F32>>& d_v) {
  const Shape s = shape_of(q, k);
  if (ffi::Error e = check(s, q, k, v, keep); e.failure()) return e;
  const int64_t stride = s.heads * s.depth;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float* dop = d_out.typed_data();
  const bool* keep_all = keep.typed_data();
  float *dqp = d_q->typed_data(), *dkp = d_k->typed_data(), *dvp = d_v->typed_data();
  parallel_for(pool, s.rows * s.heads, [&](int64_t pair) {
    const int64_t b = pair / s.heads, n = pair % s.heads;
    thread_local std::vector<float> k_t, v_t, probs, d_scores, dk_acc, dv_acc, inverse, d_out_p,
        dropped;
    thread_local std::vector<int32_t> keep_mask;
    k_t.resize(s.depth * s.len_k);
    v_t.resize(s.depth * s.len_k);
    probs.resize(QBLOCK * s.len_k);
    d_scores.resize(QBLOCK * s.len_k);
    if (kept != nullptr) dropped.resize(QBLOCK * s.len_k);
    inverse.resize(QBLOCK);
    d_out_p.resize(QBLOCK * s.depth);
    dk_acc.assign(s.depth * s.len_k, 0.0f);  // d_k^T, d_v^T: [D, Lk]
    dv_acc.assign(s.depth * s.len_k, 0.0f);
    keep_lanes(keep_all + b * s.len_k, s.len_k, keep_mask);
    const int64_t k_off = b * s.len_k * stride + n * s.depth;
    transpose(kp + k_off, s.len_k, s.depth, stride, k_t.data());
    transpose(vp + k_off, s.len_k, s.depth, stride, v_t.data());
    float *p = probs.data(), *ds = d_scores.data();
    for (int64_t first = 0; first < s.len_q; first += QBLOCK) {
      const int64_t count = std::min(QBLOCK, s.len_q - first);
      const int64_t q_off = (b * s.len_q + first) * stride + n * s.depth;
      gemm(count, s.len_k, s.depth, qp + q_off, stride, 1, k_t.data(), s.len_k, p, s.len_k, false);
      exp_rows(p, count, s.len_k, keep_mask.data(), inverse.data());
      gemm(count, s.len_k, s.depth, dop + q_off, stride, 1, v_t.data(), s.len_k, ds, s.len_k,
           false);
      // With dropout: d_probs = d_dropped * kept * scale, and d_v from the dropped exps.
      const float* v_weights = p;
      if (kept != nullptr) {
        const bool* block_kept = kept + (pair * s.len_q + first) * s.len_k;
        apply_kept(ds, block_kept, count, s.len_k, ds);
        apply_kept(p, block_kept, count, s.len_k, dropped.data());
        v_weights = dropped.data();
      }
      softmax_backward_rows(p, inverse.data(), ds, count, s.len_k, keep_mask.data(),
                            kept != nullptr ? scale : 1.0f);
      // d_v^T += d_out^T probs = (d_out * inverse * scale)^T exps.
      for (int64_t i = 0; i < count; ++i)
        for (int64_t d = 0; d < s.depth; ++d)
          d_out_p[i * s.depth + d] = dop[q_off + i * stride + d] * (inverse[i] * scale);
      gemm(count, s.depth, s.len_k, ds, s.len_k, 1, kp + k_off, stride, dqp + q_off, stride,
           false);
      gemm(s.depth, s.len_k, count, qp + q_off, 1, stride, ds, s.len_k, dk_acc.data(), s.len_k,
           true);
      gemm(s.depth, s.len_k, count, d_out_p.data(), 1, s.depth, v_weights, s.len_k,
           dv_acc.data(), s.len_k, true);
    }
    untranspose(dk_acc.data(), s.len_k, s.depth, stride, dkp + k_off);
    untranspose(dv_acc.data(), s.len_k, s.depth, stride, dvp + k_off);
  });
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> keep,
                   ffi::ResultBuffer<ffi::F32> out) {
  return forward_pass(pool, q, k, v, keep, nullptr, 1.0f, out);
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> keep,
                    ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> d_q,
                    ffi::ResultBuffer<ffi::F32> d_k, ffi::ResultBuffer<ffi::F32> d_v) {
  return backward_pass(pool, q, k, v, keep, nullptr, 1.0f, d_out, d_q, d_k, d_v);
}

ffi::Error check_kept(const Shape& s, ffi::Buffer<ffi::PRED>& kept) {
  auto dims = kept.dimensions();
  if (dims.size() != 4 || dims[0] != s.rows || dims[1] != s.heads || dims[2] != s.len_q ||
      dims[3] != s.len_k)
    return ffi::Error::InvalidArgument("attention: the dropout mask must be bool[B, N, Lq, Lk]");
  return ffi::Error::Success();
}

ffi::Error forward_dropout(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> keep,
                           ffi::Buffer<ffi::PRED> kept, float scale,
                           ffi::ResultBuffer<ffi::F32> out) {
  if (ffi::Error e = check_kept(shape_of(q, k), kept); e.failure()) return e;
  return forward_pass(pool, q, k, v, keep, kept.typed_data(), scale, out);
}

ffi::Error backward_dropout(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::PRED> keep, ffi::Buffer<ffi::PRED> kept, float scale,
                            ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> d_q,
                            ffi::ResultBuffer<ffi::F32> d_k, ffi::ResultBuffer<ffi::F32> d_v) {
  if (ffi::Error e = check_kept(shape_of(q, k), kept); e.failure()) return e;
  return backward_pass(pool, q, k, v, keep, kept.typed_data(), scale, d_out, d_q, d_k, d_v);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemsjaxAttentionForward, forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemsjaxAttentionForwardDropout, forward_dropout,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemsjaxAttentionBackwardDropout, backward_dropout,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemsjaxAttentionBackward, backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
