// flaxrestore native CPU kernels, loaded through the XLA FFI (see flaxrestore/native.py).
//
// The two transforms of a Winograd F(2x2, 3x3) convolution (flaxrestore.layers.winograd_conv3x3;
// the 16 matmuls between them stay XLA dots).
//
// winograd_input: the 4x4 input window of every 2x2 output tile, transformed:
//
//   v[a*4 + b, t, c] = sum over i, j of BT[a][i] * BT[b][j] * x[n, 2*ty - ph + i, 2*tx - pw + j, c]
//
// with tile t = (n*th + ty)*tw + tx and x zero outside the image (the conv's zero padding), and
// BT = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
//
// winograd_output: the products back to output pixels, cropped to the output size:
//
//   y[n, 2*ty + p, 2*tx + q, o] = sum over a, b of AT[p][a] * AT[q][b] * m[a*4 + b, t, o]
//
// with AT = [[1, 1, 1, 0], [0, 1, -1, -1]].
//
// XLA:CPU computes both as fused loops, and fuses the output transform into whatever consumes
// the conv (a pixel shuffle, an activation, the next conv's padding), where it ran 3-4x slower
// than alone (SNR-Aware's upsampling tail at 1x256x256: 21-22 ms per such fusion). Here each
// tile's channels are one contiguous run, read and written once, eight channels at a time
// (windows and pixels outside the image point at a zero / scratch row instead of branching).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using flaxrestore::ParallelFor;

// 8 floats in one AVX register (GCC/clang vector extension; plain code elsewhere), loaded and
// stored unaligned; the channel loops run over these, then a scalar tail.
typedef float F8 __attribute__((vector_size(32)));

inline F8 Load(const float* p) {
  F8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, F8 v) { __builtin_memcpy(p, &v, sizeof(v)); }

// One input tile's transform for channels [c, c + width): T is F8 (width 8) or float (width 1).
template <typename T, T (*Ld)(const float*), void (*St)(float*, T)>
inline void InputTile(const float* const w[4][4], float* const o[16], int64_t c) {
  T r[4][4];  // rows transformed: r[i][b] = sum_j BT[b][j] * w[i][j]
  for (int i = 0; i < 4; ++i) {
    const T a0 = Ld(w[i][0] + c), a1 = Ld(w[i][1] + c), a2 = Ld(w[i][2] + c), a3 = Ld(w[i][3] + c);
    r[i][0] = a0 - a2;
    r[i][1] = a1 + a2;
    r[i][2] = a2 - a1;
    r[i][3] = a1 - a3;
  }
  for (int b = 0; b < 4; ++b) {
    St(o[0 * 4 + b] + c, r[0][b] - r[2][b]);
    St(o[1 * 4 + b] + c, r[1][b] + r[2][b]);
    St(o[2 * 4 + b] + c, r[2][b] - r[1][b]);
    St(o[3 * 4 + b] + c, r[1][b] - r[3][b]);
  }
}

// One output tile's transform for channels [c, c + width).
template <typename T, T (*Ld)(const float*), void (*St)(float*, T)>
inline void OutputTile(const float* const s[16], float* const d[2][2], int64_t c) {
  T r[4][2];  // columns transformed: r[a][q] = sum_b AT[q][b] * m[a*4 + b]
  for (int a = 0; a < 4; ++a) {
    const T b0 = Ld(s[a * 4] + c), b1 = Ld(s[a * 4 + 1] + c), b2 = Ld(s[a * 4 + 2] + c),
            b3 = Ld(s[a * 4 + 3] + c);
    r[a][0] = b0 + b1 + b2;
    r[a][1] = b1 - b2 - b3;
  }
  for (int q = 0; q < 2; ++q) {
    St(d[0][q] + c, r[0][q] + r[1][q] + r[2][q]);
    St(d[1][q] + c, r[1][q] - r[2][q] - r[3][q]);
  }
}

inline float Load1(const float* p) { return *p; }
inline void Store1(float* p, float v) { *p = v; }

ffi::Error Input(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> src, ffi::ResultBuffer<ffi::F32> out,
                 int64_t ph, int64_t pw, int64_t th, int64_t tw) {
  const auto sd = src.dimensions(), od = out->dimensions();
  if (sd.size() != 4 || od.size() != 3 || od[0] != 16 || od[1] != sd[0] * th * tw ||
      od[2] != sd[3] || th < 1 || tw < 1) {
    return ffi::Error::InvalidArgument("winograd_input: inconsistent shapes");
  }
  const int64_t N = sd[0], H = sd[1], W = sd[2], C = sd[3], T = N * th * tw;
  const float* xs = src.typed_data();
  float* v = out->typed_data();
  const std::vector<float> zeros(C, 0.0f);
  const float* zero = zeros.data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t by_work = std::max<int64_t>(1, T * 16 * C / (1 << 15));
  ParallelFor(pool, N * th, std::min(8 * threads, by_work), [=](int64_t, int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / th, ty = row % th;
      for (int64_t tx = 0; tx < tw; ++tx) {
        const float* w[4][4];
        for (int64_t i = 0; i < 4; ++i) {
          const int64_t y = 2 * ty - ph + i;
          for (int64_t j = 0; j < 4; ++j) {
            const int64_t x = 2 * tx - pw + j;
            w[i][j] = (y >= 0 && y < H && x >= 0 && x < W) ? xs + ((n * H + y) * W + x) * C : zero;
          }
        }
        const int64_t t = row * tw + tx;
        float* o[16];
        for (int64_t k = 0; k < 16; ++k) o[k] = v + (k * T + t) * C;
        int64_t c = 0;
        for (; c + 8 <= C; c += 8) InputTile<F8, Load, Store>(w, o, c);
        for (; c < C; ++c) InputTile<float, Load1, Store1>(w, o, c);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Output(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> prod, ffi::ResultBuffer<ffi::F32> out) {
  const auto md = prod.dimensions(), yd = out->dimensions();
  if (md.size() != 3 || yd.size() != 4 || md[0] != 16 || md[2] != yd[3]) {
    return ffi::Error::InvalidArgument("winograd_output: inconsistent shapes");
  }
  const int64_t N = yd[0], Ho = yd[1], Wo = yd[2], O = yd[3];
  const int64_t th = (Ho + 1) / 2, tw = (Wo + 1) / 2, T = N * th * tw;
  if (md[1] != T) return ffi::Error::InvalidArgument("winograd_output: tile count mismatch");
  const float* m = prod.typed_data();
  float* ys = out->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t by_work = std::max<int64_t>(1, T * 16 * O / (1 << 15));
  ParallelFor(pool, N * th, std::min(8 * threads, by_work), [=](int64_t, int64_t begin, int64_t end) {
    std::vector<float> scratch(O);  // the cropped pixels of odd-sized outputs land here
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / th, ty = row % th;
      for (int64_t tx = 0; tx < tw; ++tx) {
        const int64_t t = row * tw + tx;
        const float* s[16];
        for (int64_t k = 0; k < 16; ++k) s[k] = m + (k * T + t) * O;
        float* d[2][2];
        for (int64_t p = 0; p < 2; ++p) {
          for (int64_t q = 0; q < 2; ++q) {
            const int64_t y = 2 * ty + p, x = 2 * tx + q;
            d[p][q] = (y < Ho && x < Wo) ? ys + ((n * Ho + y) * Wo + x) * O : scratch.data();
          }
        }
        int64_t c = 0;
        for (; c + 8 <= O; c += 8) OutputTile<F8, Load, Store>(s, d, c);
        for (; c < O; ++c) OutputTile<float, Load1, Store1>(s, d, c);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxrestoreWinogradInput, Input,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<int64_t>("th")
                                  .Attr<int64_t>("tw"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxrestoreWinogradOutput, Output,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
