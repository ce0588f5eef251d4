// What the CPU kernels (attention.cc, layer_norm.cc) share: the vector width and types of the
// host's instruction set, and a parallel loop over XLA's intra-op thread pool. Each kernel file
// includes it inside its own translation unit (everything here is internal to the file).

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
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

}  // namespace
