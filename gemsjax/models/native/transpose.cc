// A 2-D float32 transpose for XLA's CPU backend as an XLA FFI custom call: y[N, M] = x[M, N]^T,
// both row-major.
//
// Built with the other kernels into one library on first use by
// gemsjax/models/native_kernels.py. XLA's CPU backend realises a transpose as a layout: the
// producer writes its result column-major and every consumer reads it with strided loads,
// fused into whatever it computes (for a feed-forward layer's kernel gradient, the optimizer's
// update and the gradient clipping: several ms a step). This kernel makes the row-major copy
// once, in 32 x 32 blocks that stay in L1, the blocks of 32 input rows spread over XLA's
// intra-op thread pool.

#include "common.h"

namespace {

constexpr int64_t TILE = 32;

ffi::Error transpose(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("transpose: x must be 2-D");
  const int64_t M = dims[0], N = dims[1];
  const float* src = x.typed_data();
  float* dst = y->typed_data();
  parallel_for(pool, (M + TILE - 1) / TILE, [&](int64_t band) {
    const int64_t r0 = band * TILE, r1 = std::min(M, r0 + TILE);
    for (int64_t c0 = 0; c0 < N; c0 += TILE) {
      const int64_t c1 = std::min(N, c0 + TILE);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * M + r] = src[r * N + c];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemsjaxTranspose, transpose,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
