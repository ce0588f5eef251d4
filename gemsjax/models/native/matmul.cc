// A float32 matrix product for XLA's CPU backend as an XLA FFI custom call:
//   c[M, N] = op(a) op(b),   op(a) = a [M, K] or a^T (a: [K, M]), op(b) = b [K, N] or b^T,
// all row-major, so a dense layer's forward product, input gradient (d_out w^T) and kernel
// gradient (x^T d_out) each take one call, with no transposed copy.
//
// Built with the other kernels into one library on first use by
// gemsjax/models/native_kernels.py. Blocked the usual way for a register-tiled product: op(b) is
// packed once per block of columns (all of K, within BLOCK_B floats) into panels of NR columns,
// k-major; each work item takes MC rows of op(a) and a run of those panels, packs its rows KC
// deep at a time into panels of MR rows (zero-padded) and runs the register tile of common.h
// (MR x NR sums, AVX2: 6 x 16, AVX-512: 8 x 48) over them, a tile's KC-deep slice of op(b)
// (KC x NR floats) staying in L1 and the item's packed rows in L2 while its sums accumulate in C.
// Packing and items are spread over XLA's intra-op thread pool. Sums run over k in the same
// order whatever the number of threads: the same bits.

#include <cstring>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t MR = ROWS, NR = VECTORS * W;
constexpr int64_t KC = 256;            // depth of a packed slice of op(a)
constexpr int64_t MC = 16 * MR;        // rows of op(a) per work item
constexpr int64_t BLOCK_B = 1 << 21;   // floats of packed op(b) per block of columns (8 MiB)
constexpr int64_t ITEMS = 8;           // work items to aim for per block of columns
constexpr int64_t ROWS_PER_PACK = 64;  // rows of a row-major op(b) per packing item

// A matrix operand: element (r, c) at p[r * rs + c * cs].
struct Operand {
  const float* p;
  int64_t rs, cs;
};

// dst <- op(a)[i0 : i0 + m, k0 : k0 + kc] as ceil(m / MR) panels of kc x MR floats (element
// (r, k) of a panel at k * MR + r), the rows past m zero.
void pack_rows(const Operand& a, int64_t i0, int64_t m, int64_t k0, int64_t kc, float* dst) {
  for (int64_t i = 0; i < m; i += MR) {
    const int64_t rows = std::min(MR, m - i);
    float* panel = dst + i * kc;
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = a.p + (i0 + i) * a.rs + (k0 + k) * a.cs;
      for (int64_t r = 0; r < MR; ++r) panel[k * MR + r] = r < rows ? src[r * a.rs] : 0.0f;
    }
  }
}

// dst <- op(b)[:, j0 : j0 + n] (n <= NR columns) as one panel of K x NR floats (element (k, c)
// at k * NR + c), the columns past n zero; for op(b) = b^T (a column of op(b) is a row of b).
void pack_columns(const Operand& b, int64_t K, int64_t j0, int64_t n, float* dst) {
  for (int64_t c = 0; c < NR; ++c) {
    const float* src = b.p + (j0 + c) * b.cs;
    for (int64_t k = 0; k < K; ++k) dst[k * NR + c] = c < n ? src[k * b.rs] : 0.0f;
  }
}

// Columns [j0, j0 + n) of op(b), all K rows, packed into `packed` (panel p at p * NR * K).
void pack_b(ffi::ThreadPool& pool, const Operand& b, int64_t K, int64_t j0, int64_t n,
            float* packed) {
  const int64_t panels = (n + NR - 1) / NR;
  if (b.cs != 1) {
    parallel_for(pool, panels, [&](int64_t p) {
      pack_columns(b, K, j0 + p * NR, std::min(NR, n - p * NR), packed + p * NR * K);
    });
    return;
  }
  // Row-major op(b): each item copies whole row runs into every panel (reading rows in order).
  parallel_for(pool, (K + ROWS_PER_PACK - 1) / ROWS_PER_PACK, [&](int64_t item) {
    const int64_t k1 = std::min(K, (item + 1) * ROWS_PER_PACK);
    for (int64_t k = item * ROWS_PER_PACK; k < k1; ++k) {
      const float* src = b.p + k * b.rs + j0;
      for (int64_t p = 0; p < panels; ++p) {
        float* dst = packed + (p * K + k) * NR;
        const int64_t cols = std::min(NR, n - p * NR);
        if (cols == NR) {
          std::memcpy(dst, src + p * NR, NR * sizeof(float));
        } else {
          for (int64_t c = 0; c < NR; ++c) dst[c] = c < cols ? src[p * NR + c] : 0.0f;
        }
      }
    }
  });
}

// c[M, N] = op(a) op(b), c row-major.
void product(ffi::ThreadPool& pool, int64_t M, int64_t N, int64_t K, Operand a, Operand b,
             float* c) {
  const int64_t all_columns = (N + NR - 1) / NR * NR;
  const int64_t block = std::max(NR, std::min(all_columns, BLOCK_B / std::max<int64_t>(K, 1) / NR * NR));
  std::vector<float> packed(block * K);
  const int64_t row_blocks = (M + MC - 1) / MC;
  for (int64_t j0 = 0; j0 < N; j0 += block) {
    const int64_t n = std::min(block, N - j0), panels = (n + NR - 1) / NR;
    pack_b(pool, b, K, j0, n, packed.data());
    const int64_t runs = std::min(panels, std::max<int64_t>(1, (ITEMS + row_blocks - 1) / row_blocks));
    const int64_t run = (panels + runs - 1) / runs;
    parallel_for(pool, row_blocks * runs, [&](int64_t item) {
      const int64_t i0 = item / runs * MC, m = std::min(MC, M - i0);
      const int64_t p0 = item % runs * run, p1 = std::min(panels, p0 + run);
      thread_local std::vector<float> rows;
      rows.resize(MC * KC);
      alignas(64) float edge[MR * NR];
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        const bool accumulate = k0 > 0;
        pack_rows(a, i0, m, k0, kc, rows.data());
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t j = p * NR, cols = std::min(NR, n - j);
          const float* panel = packed.data() + p * NR * K + k0 * NR;
          for (int64_t i = 0; i < m; i += MR) {
            float* tile_c = c + (i0 + i) * N + j0 + j;
            const int64_t tile_rows = std::min(MR, m - i);
            if (tile_rows == MR && cols == NR) {
              tile<MR, VECTORS>(kc, rows.data() + i * kc, panel, NR, tile_c, N, accumulate);
              continue;
            }
            // A tile at the edge of C: its sums in `edge`, copied in and out.
            for (int64_t r = 0; r < tile_rows; ++r)
              for (int64_t q = 0; q < NR; ++q)
                edge[r * NR + q] = accumulate && q < cols ? tile_c[r * N + q] : 0.0f;
            tile<MR, VECTORS>(kc, rows.data() + i * kc, panel, NR, edge, NR, true);
            for (int64_t r = 0; r < tile_rows; ++r)
              std::memcpy(tile_c + r * N, edge + r * NR, cols * sizeof(float));
          }
        }
      }
    });
  }
}

ffi::Error matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2)
    return ffi::Error::InvalidArgument("matmul: a, b and c must be 2-D");
  const int64_t M = transpose_a ? da[1] : da[0], K = transpose_a ? da[0] : da[1];
  const int64_t N = transpose_b ? db[0] : db[1];
  if ((transpose_b ? db[1] : db[0]) != K || dc[0] != M || dc[1] != N)
    return ffi::Error::InvalidArgument("matmul: shapes of a, b and c disagree");
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(c->typed_data(), 0, M * N * sizeof(float));
    return ffi::Error::Success();
  }
  const Operand op_a = transpose_a ? Operand{a.typed_data(), 1, M} : Operand{a.typed_data(), K, 1};
  const Operand op_b = transpose_b ? Operand{b.typed_data(), 1, K} : Operand{b.typed_data(), N, 1};
  if (M < N && K * N > BLOCK_B) {
    // op(b) would be packed in several blocks of columns, op(a) repacked for each: c^T =
    // op(b)^T op(a)^T packs the small operand whole instead, and one transpose writes c.
    std::vector<float> c_t(N * M);
    product(pool, N, M, K, Operand{op_b.p, op_b.cs, op_b.rs}, Operand{op_a.p, op_a.cs, op_a.rs},
            c_t.data());
    transpose_rows(pool, c_t.data(), N, M, c->typed_data());
    return ffi::Error::Success();
  }
  product(pool, M, N, K, op_a, op_b, c->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemsjaxMatmul, matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
