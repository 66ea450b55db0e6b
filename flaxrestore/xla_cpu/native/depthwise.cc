// flaxrestore native CPU kernels, loaded through the XLA FFI (see flaxrestore/native.py).
//
// depthwise_conv: a stride-1 depthwise convolution, NHWC, kernel (kh, kw, 1, C), zero padding
// given as the top/left offsets and the output size (so that the input gradient, a conv of the
// output gradient with the flipped kernel and other padding, is the same kernel):
//
//   y[b, ho, wo, c] = sum over i, j of  x[b, ho + i*dh - pt, wo + j*dw - pl, c] * k[i, j, c]
//
// Each output pixel's taps are summed in a buffer of C floats (cache-resident), channels
// innermost, and stored once.
//
// depthwise_kernel_grad: the kernel gradient of a stride-1 depthwise convolution, NHWC.
//
//   dk[i, j, c] = sum over b, ho, wo of  x[b, ho + i*dh - ph, wo + j*dw - pw, c] * dy[b, ho, wo, c]
//
// (x is zero outside its bounds). XLA:CPU computes this as kh*kw separate reductions, each over
// a materialized shifted copy of x: about 10 passes over memory. Here it is one pass: every
// output row of dy is read once per kernel row while it sits in cache, with the channel loop
// innermost (contiguous, vectorized). Each output row's products are summed in float32 (at most
// W terms), rows are summed in float64 per chunk of rows, and chunks are summed in a fixed order,
// so the result does not depend on how the chunks were spread over threads.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using flaxrestore::ParallelFor;

struct Geometry {
  int64_t B, H, W, C;  // x
  int64_t Ho, Wo;      // dy
  int64_t kh, kw, ph, pw, dh, dw;
};

// Adds the contribution of output rows [row_begin, row_end) (row = b * Ho + ho) to acc
// (kh * kw * C doubles); racc is scratch of kh * kw * C floats.
void AccumulateRows(const Geometry& g, const float* x, const float* dy, int64_t row_begin,
                    int64_t row_end, double* acc, float* racc) {
  const int64_t C = g.C, taps = g.kh * g.kw;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / g.Ho, ho = row % g.Ho;
    const float* dyrow = dy + (b * g.Ho + ho) * g.Wo * C;
    std::fill(racc, racc + taps * C, 0.0f);
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t hx = ho + i * g.dh - g.ph;
      if (hx < 0 || hx >= g.H) continue;
      const float* xrow = x + (b * g.H + hx) * g.W * C;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t shift = j * g.dw - g.pw;  // x column = wo + shift
        const int64_t wo_begin = std::max<int64_t>(0, -shift);
        const int64_t wo_end = std::min<int64_t>(g.Wo, g.W - shift);
        float* r = racc + (i * g.kw + j) * C;
        for (int64_t wo = wo_begin; wo < wo_end; ++wo) {
          const float* xp = xrow + (wo + shift) * C;
          const float* dp = dyrow + wo * C;
          for (int64_t c = 0; c < C; ++c) r[c] += xp[c] * dp[c];
        }
      }
    }
    for (int64_t t = 0; t < taps * C; ++t) acc[t] += racc[t];
  }
}

ffi::Error DepthwiseConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                         ffi::ResultBuffer<ffi::F32> y, int64_t pt, int64_t pl, int64_t dh,
                         int64_t dw) {
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || kd[2] != 1 || kd[3] != xd[3] ||
      yd[0] != xd[0] || yd[3] != xd[3]) {
    return ffi::Error::InvalidArgument("depthwise_conv: inconsistent shapes");
  }
  const int64_t B = xd[0], H = xd[1], W = xd[2], C = xd[3], Ho = yd[1], Wo = yd[2];
  const int64_t kh = kd[0], kw = kd[1];
  const float* xs = x.typed_data();
  const float* ks = k.typed_data();
  float* ys = y->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t by_work = std::max<int64_t>(1, B * Ho * Wo * C * kh * kw / (1 << 18));
  ParallelFor(pool, B * Ho, std::min(4 * threads, by_work),
              [=](int64_t, int64_t begin, int64_t end) {
    std::vector<float> acc(C);
    std::vector<const float*> rows(kh);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / Ho, ho = row % Ho;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t hx = ho + i * dh - pt;
        rows[i] = (hx < 0 || hx >= H) ? nullptr : xs + (b * H + hx) * W * C;
      }
      float* yrow = ys + row * Wo * C;
      for (int64_t wo = 0; wo < Wo; ++wo) {
        // all taps of one output pixel summed in a cache-resident buffer, stored once
        float* a = acc.data();
        std::fill(a, a + C, 0.0f);
        for (int64_t i = 0; i < kh; ++i) {
          if (rows[i] == nullptr) continue;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t wx = wo + j * dw - pl;
            if (wx < 0 || wx >= W) continue;
            const float* xp = rows[i] + wx * C;
            const float* kt = ks + (i * kw + j) * C;
            for (int64_t c = 0; c < C; ++c) a[c] += xp[c] * kt[c];
          }
        }
        std::copy(a, a + C, yrow + wo * C);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error DepthwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                               int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || kd.size() != 4) {
    return ffi::Error::InvalidArgument("depthwise_kernel_grad: x, dy and dk must be 4-D");
  }
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], kd[0], kd[1], ph, pw, dh, dw};
  if (yd[0] != g.B || yd[3] != g.C || kd[2] != 1 || kd[3] != g.C ||
      g.Ho != g.H + 2 * ph - dh * (g.kh - 1) || g.Wo != g.W + 2 * pw - dw * (g.kw - 1)) {
    return ffi::Error::InvalidArgument("depthwise_kernel_grad: inconsistent shapes");
  }
  const int64_t tc = g.kh * g.kw * g.C;
  const int64_t rows = g.B * g.Ho;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // a few chunks per thread balance the load; each chunk's partial sums cost tc doubles
  const int64_t by_work = std::max<int64_t>(1, rows * g.Wo * tc / (1 << 18));
  const int64_t chunks = std::max<int64_t>(1, std::min({rows, 4 * threads, by_work}));
  std::vector<double> partial(chunks * tc, 0.0);
  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  double* parts = partial.data();
  ParallelFor(pool, rows, chunks, [=](int64_t k, int64_t begin, int64_t end) {
    std::vector<float> racc(tc);
    AccumulateRows(g, xs, dys, begin, end, parts + k * tc, racc.data());
  });
  float* out = dk->typed_data();
  for (int64_t t = 0; t < tc; ++t) {
    double s = 0.0;
    for (int64_t k = 0; k < chunks; ++k) s += partial[k * tc + t];
    out[t] = static_cast<float>(s);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxrestoreDepthwiseConv, DepthwiseConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxrestoreDepthwiseKernelGrad, DepthwiseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw"));
