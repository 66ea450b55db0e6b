// flaxrestore native CPU kernels, loaded through the XLA FFI (see flaxrestore/native.py).
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

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

// Work shared between the calling thread and the pool's helpers; owned jointly (a helper that
// starts after all chunks are claimed must still find it alive).
struct Job {
  Geometry g;
  const float* x;
  const float* dy;
  int64_t rows, chunks;
  std::vector<double> partial;  // chunks x taps x C
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mu;
  std::condition_variable cv;

  void Work() {
    const int64_t tc = g.kh * g.kw * g.C;
    std::vector<float> racc(tc);
    for (;;) {
      const int64_t k = next.fetch_add(1);
      if (k >= chunks) return;
      const int64_t begin = rows * k / chunks, end = rows * (k + 1) / chunks;
      AccumulateRows(g, x, dy, begin, end, partial.data() + k * tc, racc.data());
      if (finished.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

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
  auto job = std::make_shared<Job>();
  job->g = g;
  job->x = x.typed_data();
  job->dy = dy.typed_data();
  job->rows = g.B * g.Ho;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // a few chunks per thread balance the load; each chunk's partial sums cost tc doubles
  const int64_t work = g.B * g.Ho * g.Wo * tc;
  const int64_t by_work = std::max<int64_t>(1, work / (1 << 18));
  job->chunks = std::max<int64_t>(1, std::min({job->rows, 4 * threads, by_work}));
  job->partial.assign(job->chunks * tc, 0.0);
  for (int64_t t = 1; t < std::min(threads, job->chunks); ++t) {
    pool.Schedule([job] { job->Work(); });
  }
  job->Work();
  {
    std::unique_lock<std::mutex> lock(job->mu);
    job->cv.wait(lock, [&] { return job->finished.load() == job->chunks; });
  }
  float* out = dk->typed_data();
  for (int64_t t = 0; t < tc; ++t) {
    double s = 0.0;
    for (int64_t k = 0; k < job->chunks; ++k) s += job->partial[k * tc + t];
    out[t] = static_cast<float>(s);
  }
  return ffi::Error::Success();
}

}  // namespace

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
