// LayerNorm over the last axis for XLA's CPU backend as XLA FFI custom calls: forward and
// backward, float32.
//
// Built with attention.cc into one library on first use by gemsjax/models/native_kernels.py and
// called through jax.ffi. Same function as gemsjax.models.backend.layer_norm on x: [..., H]
// (rows of H features), scale, bias: [H]:
//   y = (x - mean) * rstd * scale + bias,   rstd = 1 / sqrt(mean((x - mean)^2) + eps)
// (two-pass variance, as PyTorch). The forward pass also returns each row's (mean, rstd); the
// backward pass recomputes x_hat from them and writes
//   dx = rstd * (d - mean(d) - x_hat * mean(d * x_hat)),   d = g * scale,
// and the row sums of g * x_hat and g (the scale's and bias's gradients). Work items are blocks
// of 64 rows spread over XLA's intra-op thread pool; a row (H floats) stays in L1 across its
// passes, so each array is read or written once. The parameter gradients are summed per block
// and the blocks' sums added in block order: the same bits whatever the number of threads.

#include <cmath>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t BLOCK = 64;  // rows per work item

inline float lanes_sum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// body(block, first, last) for each block of BLOCK rows [first, last), on the pool.
void for_row_blocks(ffi::ThreadPool& pool, int64_t rows,
                    const std::function<void(int64_t, int64_t, int64_t)>& body) {
  parallel_for(pool, (rows + BLOCK - 1) / BLOCK, [&](int64_t block) {
    body(block, block * BLOCK, std::min(rows, (block + 1) * BLOCK));
  });
}

ffi::Error check(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& scale, int64_t& rows,
                 int64_t& features) {
  auto dims = x.dimensions();
  if (dims.size() == 0 || dims.back() == 0)
    return ffi::Error::InvalidArgument("layer_norm: x must be [..., H] with H > 0");
  features = dims.back();
  rows = x.element_count() / features;
  if (scale.element_count() != features)
    return ffi::Error::InvalidArgument("layer_norm: scale and bias must be [H], H = x's last axis");
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, float eps, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> stats) {
  int64_t rows, H;
  if (ffi::Error e = check(x, scale, rows, H); e.failure()) return e;
  if (bias.element_count() != H)
    return ffi::Error::InvalidArgument("layer_norm: scale and bias must be [H], H = x's last axis");
  const float *xs = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  float *ys = y->typed_data(), *st = stats->typed_data();
  const int64_t full = H - H % W;
  for_row_blocks(pool, rows, [&](int64_t, int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float* xr = xs + r * H;
      float* yr = ys + r * H;
      vf sums{};
      for (int64_t h = 0; h < full; h += W) sums += load(xr + h);
      float total = lanes_sum(sums);
      for (int64_t h = full; h < H; ++h) total += xr[h];
      const float mean = total / H;
      const vf m = splat(mean);
      vf squares{};
      for (int64_t h = 0; h < full; h += W) {
        const vf c = load(xr + h) - m;
        squares += c * c;
      }
      float var = lanes_sum(squares);
      for (int64_t h = full; h < H; ++h) var += (xr[h] - mean) * (xr[h] - mean);
      const float rstd = 1.0f / std::sqrt(var / H + eps);
      const vf rs = splat(rstd);
      for (int64_t h = 0; h < full; h += W)
        store(yr + h, (load(xr + h) - m) * rs * load(sp + h) + load(bp + h));
      for (int64_t h = full; h < H; ++h) yr[h] = (xr[h] - mean) * rstd * sp[h] + bp[h];
      st[2 * r] = mean;
      st[2 * r + 1] = rstd;
    }
  });
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> stats,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> g,
                    ffi::ResultBuffer<ffi::F32> d_x, ffi::ResultBuffer<ffi::F32> d_params) {
  int64_t rows, H;
  if (ffi::Error e = check(x, scale, rows, H); e.failure()) return e;
  if (g.element_count() != x.element_count() || stats.element_count() != 2 * rows ||
      d_params->element_count() != 2 * H)
    return ffi::Error::InvalidArgument("layer_norm: g like x, stats [..., 2], d_params 2 * H");
  const float *xs = x.typed_data(), *st = stats.typed_data(), *sp = scale.typed_data();
  const float* gs = g.typed_data();
  float *dxs = d_x->typed_data(), *dp = d_params->typed_data();
  const int64_t full = H - H % W, blocks = (rows + BLOCK - 1) / BLOCK;
  std::vector<float> partial(blocks * 2 * H, 0.0f);  // per block: d_scale[H], d_bias[H]
  for_row_blocks(pool, rows, [&](int64_t block, int64_t first, int64_t last) {
    float* d_scale = partial.data() + block * 2 * H;
    float* d_bias = d_scale + H;
    for (int64_t r = first; r < last; ++r) {
      const float *xr = xs + r * H, *gr = gs + r * H;
      float* dxr = dxs + r * H;
      const float mean = st[2 * r], rstd = st[2 * r + 1];
      const vf m = splat(mean), rs = splat(rstd);
      vf d_sums{}, dx_sums{};
      for (int64_t h = 0; h < full; h += W) {
        const vf x_hat = (load(xr + h) - m) * rs, gv = load(gr + h), d = gv * load(sp + h);
        d_sums += d;
        dx_sums += d * x_hat;
        store(d_scale + h, load(d_scale + h) + gv * x_hat);
        store(d_bias + h, load(d_bias + h) + gv);
      }
      float d_total = lanes_sum(d_sums), dx_total = lanes_sum(dx_sums);
      for (int64_t h = full; h < H; ++h) {
        const float x_hat = (xr[h] - mean) * rstd, d = gr[h] * sp[h];
        d_total += d;
        dx_total += d * x_hat;
        d_scale[h] += gr[h] * x_hat;
        d_bias[h] += gr[h];
      }
      const float d_mean = d_total / H, dx_mean = dx_total / H;
      const vf dm = splat(d_mean), dxm = splat(dx_mean);
      for (int64_t h = 0; h < full; h += W) {
        const vf x_hat = (load(xr + h) - m) * rs;
        store(dxr + h, rs * (load(gr + h) * load(sp + h) - dm - x_hat * dxm));
      }
      for (int64_t h = full; h < H; ++h)
        dxr[h] = rstd * (gr[h] * sp[h] - d_mean - (xr[h] - mean) * rstd * dx_mean);
    }
  });
  std::fill(dp, dp + 2 * H, 0.0f);
  for (int64_t block = 0; block < blocks; ++block)
    for (int64_t h = 0; h < 2 * H; ++h) dp[h] += partial[block * 2 * H + h];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemsjaxLayerNormForward, forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemsjaxLayerNormBackward, backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
