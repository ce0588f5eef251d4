// A 2-D float32 transpose for XLA's CPU backend as an XLA FFI custom call: y[N, M] = x[M, N]^T,
// both row-major.
//
// Built with the other kernels into one library on first use by
// gemsjax/models/native_kernels.py. XLA's CPU backend realises a transpose as a layout: the
// producer writes its result column-major and every consumer reads it with strided loads,
// fused into whatever it computes (for a feed-forward layer's kernel gradient, the optimizer's
// update and the gradient clipping: several ms a step). This kernel makes the row-major copy
// once (common.h's transpose_rows).

#include "common.h"

namespace {

ffi::Error transpose(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("transpose: x must be 2-D");
  transpose_rows(pool, x.typed_data(), dims[0], dims[1], y->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemsjaxTranspose, transpose,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
