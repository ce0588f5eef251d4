// What the CPU kernels (attention.cc, layer_norm.cc, matmul.cc, transpose.cc) share: the vector
// width and types of the host's instruction set, the register-tiled matmul step, a parallel loop
// over XLA's intra-op thread pool and a 2-D transpose on it. Each kernel file includes it inside
// its own translation unit (everything here is internal to the file).

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <immintrin.h>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One vector of W floats (vf), of W int32 lane conditions (vi) and of W bytes (vb). AVX-512: 16
// lanes, and its 32 registers hold register tiles of 8 rows x 3 vectors; AVX2 + FMA: 8 lanes, and
// its 16 registers hold 6 rows x 2 vectors (12 sums, 2 B vectors, 1 broadcast).
#if defined(__AVX512F__)
constexpr int W = 16;
constexpr int ROWS = 8;
constexpr int VECTORS = 3;  // the widest tile, in vectors
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int W = 8;
constexpr int ROWS = 6;
constexpr int VECTORS = 2;
#else
#error "the CPU kernels need AVX-512 or AVX2 with FMA (-march=native on such a host)"
#endif
typedef float vf __attribute__((vector_size(4 * W), aligned(4)));
typedef int32_t vi __attribute__((vector_size(4 * W), aligned(4)));
typedef uint8_t vb __attribute__((vector_size(W), aligned(1)));

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf*>(p) = x; }

// One float broadcast to every lane, read from memory (a load-port broadcast that leaves the
// FMA ports free; GCC's generic splat broadcasts from a register, on an FMA port). Through
// set1 of a plain load, not _mm256_broadcast_ss(p): GCC treats that builtin's read as possibly
// touching any memory, and then stores a register tile's sums to the stack after every FMA
// (1.7x slower on AVX2).
#if defined(__AVX512F__)
inline vf splat_from(const float* p) { return reinterpret_cast<vf>(_mm512_set1_ps(*p)); }
#else
inline vf splat_from(const float* p) { return reinterpret_cast<vf>(_mm256_set1_ps(*p)); }
#endif

// C[R, NV*W] (+)= A[R, K] B[K, NV*W], A packed k-major (A's (r, k) at panel[k*R + r]), B's row
// k at b + k*ldb, C's rows ldc apart.
template <int R, int NV>
inline void tile(int64_t K, const float* panel, const float* b, int64_t ldb, float* c,
                 int64_t ldc, bool accumulate) {
  vf sum[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) sum[r][v] = accumulate ? load(c + r * ldc + v * W) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b + k * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      vf av = splat_from(panel + k * R + r);
      for (int v = 0; v < NV; ++v) sum[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * W, sum[r][v]);
}

// Runs body(item) for item in [0, items) on the calling thread and the pool's threads.
void parallel_for(ffi::ThreadPool& pool, int64_t items, const std::function<void(int64_t)>& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};
    int64_t items;
    const std::function<void(int64_t)>* body;
  };
  auto state = std::make_shared<State>();
  state->items = items;
  state->body = &body;
  auto drain = [](State& s) {
    for (int64_t i = s.next.fetch_add(1); i < s.items; i = s.next.fetch_add(1)) (*s.body)(i);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items - 1);
  for (int64_t h = 0; h < helpers; ++h)
    pool.Schedule([state, drain] {
      state->active.fetch_add(1);
      drain(*state);
      state->active.fetch_sub(1);
    });
  drain(*state);
  // A helper that starts after this point finds no items left and never reads `body`.
  while (state->active.load() != 0) std::this_thread::yield();
}

// dst[N, M] = src[M, N]^T, both row-major, in 32 x 32 blocks that stay in L1, the bands of 32
// rows of src spread over the pool.
void transpose_rows(ffi::ThreadPool& pool, const float* src, int64_t M, int64_t N, float* dst) {
  constexpr int64_t TILE = 32;
  parallel_for(pool, (M + TILE - 1) / TILE, [&](int64_t band) {
    const int64_t r0 = band * TILE, r1 = std::min(M, r0 + TILE);
    for (int64_t c0 = 0; c0 < N; c0 += TILE) {
      const int64_t c1 = std::min(N, c0 + TILE);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * M + r] = src[r * N + c];
    }
  });
}

}  // namespace
