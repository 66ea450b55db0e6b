// flaxrestore native CPU kernel, loaded through the XLA FFI (see flaxrestore/native.py).
//
// windows: the shifted windows of an NHWC image that the taps of a stride-1 convolution read,
// side by side on the channel axis (an "im2col" in NHWC order), for a conv's kernel gradient
// as one matmul:
//
//   out[b, y, x, (i*kw + j)*C + c] = src[b, y + oy + i*sy, x + ox + j*sx, c]   (0 outside src)
//
// The tap steps sy, sx may be negative (the gradient's windows of dy run backwards). Each
// output pixel's kh*kw*C values are written contiguously, one run of C floats per tap. XLA:CPU
// writes the same array as a concatenation of kh*kw slices, about 3x slower (2x128x128x96,
// 3x3: 32 ms).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error Windows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> src, ffi::ResultBuffer<ffi::F32> out,
                   int64_t kh, int64_t kw, int64_t oy, int64_t ox, int64_t sy, int64_t sx) {
  const auto sd = src.dimensions(), od = out->dimensions();
  if (sd.size() != 4 || od.size() != 4 || kh < 1 || kw < 1 || od[0] != sd[0] ||
      od[3] != kh * kw * sd[3]) {
    return ffi::Error::InvalidArgument("windows: inconsistent shapes");
  }
  const int64_t B = sd[0], H = sd[1], W = sd[2], C = sd[3], Ho = od[1], Wo = od[2];
  const int64_t taps = kh * kw;
  const float* xs = src.typed_data();
  float* ys = out->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t by_work = std::max<int64_t>(1, B * Ho * Wo * taps * C / (1 << 16));
  flaxrestore::ParallelFor(pool, B * Ho, std::min(8 * threads, by_work),
                           [=](int64_t, int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / Ho, y = row % Ho;
      float* orow = ys + row * Wo * taps * C;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t hy = y + oy + i * sy;
        const bool row_ok = hy >= 0 && hy < H;
        const float* srow = xs + (b * H + (row_ok ? hy : 0)) * W * C;
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t t = i * kw + j, shift = ox + j * sx;  // source column = x + shift
          // output columns whose source column is inside the image
          const int64_t x0 = row_ok ? std::clamp<int64_t>(-shift, 0, Wo) : Wo;
          const int64_t x1 = row_ok ? std::clamp<int64_t>(W - shift, x0, Wo) : Wo;
          float* o = orow + t * C;
          for (int64_t x = 0; x < x0; ++x) std::memset(o + x * taps * C, 0, C * sizeof(float));
          for (int64_t x = x0; x < x1; ++x) {
            std::memcpy(o + x * taps * C, srow + (x + shift) * C, C * sizeof(float));
          }
          for (int64_t x = x1; x < Wo; ++x) std::memset(o + x * taps * C, 0, C * sizeof(float));
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxrestoreWindows, Windows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("oy")
                                  .Attr<int64_t>("ox")
                                  .Attr<int64_t>("sy")
                                  .Attr<int64_t>("sx"));
