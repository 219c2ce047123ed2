// The "native" selective scan: the fused method's algorithm as a C++ XLA FFI
// kernel for the CPU, compiled on first use by mamba_pkd/ssm/native.py.
//
// Arrays (float32, row-major); S streams (e.g. both directions of a
// bidirectional mixer), each with its own parameters:
//   u, delta, gy, y, gu, gdelta  [S, B, L, D]
//   Bm, Cm, gB, gC               [S, B, L, N]
//   At                           [S, N, D]    (A transposed: D innermost)
//   Dk, bias                     [S, D]
//   hs                           [S, B, nc, N, D]  states at chunk starts
//   gA                           [S, B, N, D]  per batch row (summed by JAX)
//   gD, gbias                    [S, B, D]     per batch row (summed by JAX)
// Stream s runs from t = L - 1 down to 0 when bit s of reverse_mask is set.
//
// Each (stream, batch row) is independent and computed by one thread in a fixed
// order, so the results do not depend on the number of threads. The state of a
// row is [N, D] (D innermost: the inner loops are over D and vectorise). The
// forward saves the state at every chunk start; the backward recomputes one
// chunk's states and dA = exp(dt A) from the saved start state, then runs the
// reverse-time recurrence of the state gradient g_t = C_t gy_t + dA_{t+1} g_{t+1}
// (the same formulas as mamba_pkd/ssm/fused.py's _fused_tile_backward).
//
// The backward of the mixer's causal depthwise convolution with its SiLU
// (layers.CausalDepthwiseConv1d; its forward stays in XLA, one fused loop) is here too:
//   x, gy, gx       [B, L, E]
//   w               [K, E]   (tap k reads x_{t-K+1+k})
//   bias            [E]
//   gw              [B, K, E] per batch row (summed by JAX)
//   gbias           [B, E]    per batch row (summed by JAX)
// for out_t = act(bias + sum_k w_k x_{t-K+1+k}) with act = SiLU (or the identity); it
// recomputes the pre-activation instead of reading a saved one.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Dims {
  int64_t S, B, L, D, N, T, nc;
};

inline float Softplus(float x) {
  // log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|)).
  return std::max(x, 0.0f) + std::log1p(std::exp(-std::fabs(x)));
}

inline float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// The backward's sigmoid of dt's pre-activation, one scalar exp per element. Kept out of
// line so that its loop stays scalar: the results of every version so far come from the
// scalar exp, and a vectorised one (libmvec) rounds differently. With the call inside the
// per-step loop below, GCC could not vectorise that loop at all (it was half of the
// backward's time for the students).
__attribute__((noinline, optimize("no-tree-vectorize"))) void SigmoidScalar(
    const float* __restrict x, int64_t D, float* __restrict out) {
  for (int64_t d = 0; d < D; ++d) out[d] = Sigmoid(x[d]);
}

// dt (and its pre-activation) of one time step.
inline void StepDt(const float* __restrict delta_t, const float* __restrict bias,
                   bool softplus, int64_t D, float* __restrict pre,
                   float* __restrict dt) {
  for (int64_t d = 0; d < D; ++d) {
    const float p = delta_t[d] + bias[d];
    pre[d] = p;
    dt[d] = softplus ? Softplus(p) : p;
  }
}

// Runs fn(row) for rows [0, rows) on `threads` threads (contiguous blocks).
template <typename Fn>
void ParallelRows(int64_t rows, int64_t threads, Fn fn) {
  threads = std::max<int64_t>(1, std::min(threads, rows));
  if (threads == 1) {
    for (int64_t r = 0; r < rows; ++r) fn(r);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (rows + threads - 1) / threads;
  for (int64_t k = 1; k < threads; ++k) {
    const int64_t lo = k * per, hi = std::min(rows, lo + per);
    if (lo >= hi) break;
    pool.emplace_back([lo, hi, &fn] {
      for (int64_t r = lo; r < hi; ++r) fn(r);
    });
  }
  for (int64_t r = 0; r < std::min(rows, per); ++r) fn(r);
  for (auto& t : pool) t.join();
}

void ForwardRow(const Dims& m, int64_t s, int64_t b, bool rev, bool softplus,
                const float* u, const float* delta, const float* At,
                const float* Bm, const float* Cm, const float* Dk,
                const float* bias, float* y, float* hs, float* h, float* pre,
                float* dt) {
  const int64_t D = m.D, N = m.N, L = m.L;
  const int64_t row = s * m.B + b;
  const float* u_r = u + row * L * D;
  const float* delta_r = delta + row * L * D;
  const float* B_r = Bm + row * L * N;
  const float* C_r = Cm + row * L * N;
  const float* A_s = At + s * N * D;
  const float* Dk_s = Dk + s * D;
  const float* bias_s = bias + s * D;
  float* y_r = y + row * L * D;
  float* hs_r = hs + row * m.nc * N * D;
  std::fill(h, h + N * D, 0.0f);
  for (int64_t step = 0; step < L; ++step) {
    const int64_t t = rev ? L - 1 - step : step;
    if (step % m.T == 0) std::memcpy(hs_r + (step / m.T) * N * D, h, sizeof(float) * N * D);
    StepDt(delta_r + t * D, bias_s, softplus, D, pre, dt);
    const float* __restrict u_t = u_r + t * D;
    float* __restrict y_t = y_r + t * D;
    for (int64_t d = 0; d < D; ++d) y_t[d] = 0.0f;
    for (int64_t n = 0; n < N; ++n) {
      const float bn = B_r[t * N + n], cn = C_r[t * N + n];
      float* __restrict h_n = h + n * D;
      const float* __restrict A_n = A_s + n * D;
      for (int64_t d = 0; d < D; ++d) {
        const float v = std::exp(dt[d] * A_n[d]) * h_n[d] + dt[d] * u_t[d] * bn;
        h_n[d] = v;
        y_t[d] += v * cn;
      }
    }
    for (int64_t d = 0; d < D; ++d) y_t[d] += u_t[d] * Dk_s[d];
  }
}

// Per-thread buffers of the backward, reused across rows and calls (every element is
// written before it is read: g is zeroed per row, the rest per chunk or step).
struct BackwardScratch {
  std::vector<float> g, H, dA, pre, dt, gbs, gd, sig;
  void Resize(const Dims& m) {
    g.resize(m.N * m.D);
    H.resize((m.T + 1) * m.N * m.D);
    dA.resize(m.T * m.N * m.D);
    pre.resize(m.T * m.D);
    dt.resize(m.T * m.D);
    gbs.resize(m.D);
    gd.resize(m.D);
    sig.resize(m.D);
  }
};

void BackwardRow(const Dims& m, int64_t s, int64_t b, bool rev, bool softplus,
                 const float* u, const float* delta, const float* At,
                 const float* Bm, const float* Cm, const float* Dk,
                 const float* bias, const float* gy, const float* hs, float* gu,
                 float* gdelta, float* gB, float* gC, float* gA, float* gD,
                 float* gbias, BackwardScratch& w) {
  const int64_t D = m.D, N = m.N, L = m.L, ND = m.N * m.D;
  const int64_t row = s * m.B + b;
  const float* u_r = u + row * L * D;
  const float* delta_r = delta + row * L * D;
  const float* B_r = Bm + row * L * N;
  const float* C_r = Cm + row * L * N;
  const float* gy_r = gy + row * L * D;
  const float* A_s = At + s * ND;
  const float* Dk_s = Dk + s * D;
  const float* bias_s = bias + s * D;
  const float* hs_r = hs + row * m.nc * ND;
  float* gu_r = gu + row * L * D;
  float* gdelta_r = gdelta + row * L * D;
  float* gB_r = gB + row * L * N;
  float* gC_r = gC + row * L * N;
  float* gA_r = gA + row * ND;
  float* gD_r = gD + row * D;
  float* gbias_r = gbias + row * D;
  std::fill(w.g.begin(), w.g.end(), 0.0f);
  std::fill(gA_r, gA_r + ND, 0.0f);
  std::fill(gD_r, gD_r + D, 0.0f);
  std::fill(gbias_r, gbias_r + D, 0.0f);
  float* __restrict g = w.g.data();
  float* __restrict gbs = w.gbs.data();
  float* __restrict gd = w.gd.data();
  // ddelta = ddt * sigmoid(pre) with softplus (refilled per step), else ddt * 1: x * 1 is
  // exact, the same bits as no factor.
  float* __restrict sig = w.sig.data();
  if (!softplus) std::fill(sig, sig + D, 1.0f);
  for (int64_t c = m.nc - 1; c >= 0; --c) {
    const int64_t s0 = c * m.T, s1 = std::min(L, s0 + m.T);
    // Recompute the chunk: H[k] is the state before step s0 + k.
    std::memcpy(w.H.data(), hs_r + c * ND, sizeof(float) * ND);
    for (int64_t step = s0; step < s1; ++step) {
      const int64_t k = step - s0, t = rev ? L - 1 - step : step;
      float* __restrict pre = w.pre.data() + k * D;
      float* __restrict dt = w.dt.data() + k * D;
      StepDt(delta_r + t * D, bias_s, softplus, D, pre, dt);
      const float* __restrict u_t = u_r + t * D;
      const float* __restrict gy_t = gy_r + t * D;
      for (int64_t n = 0; n < N; ++n) {
        const float bn = B_r[t * N + n];
        const float* __restrict A_n = A_s + n * D;
        const float* __restrict hp = w.H.data() + k * ND + n * D;
        float* __restrict hn = w.H.data() + (k + 1) * ND + n * D;
        float* __restrict dA = w.dA.data() + k * ND + n * D;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) {
          const float e = std::exp(dt[d] * A_n[d]);
          dA[d] = e;
          const float v = e * hp[d] + dt[d] * u_t[d] * bn;
          hn[d] = v;
          acc += v * gy_t[d];
        }
        gC_r[t * N + n] = acc;  // dL/dC_t = sum_d gy_t h_t
      }
    }
    // Reverse-time recurrence over the chunk.
    for (int64_t step = s1 - 1; step >= s0; --step) {
      const int64_t k = step - s0, t = rev ? L - 1 - step : step;
      const float* __restrict pre = w.pre.data() + k * D;
      const float* __restrict dt = w.dt.data() + k * D;
      const float* __restrict u_t = u_r + t * D;
      const float* __restrict gy_t = gy_r + t * D;
      for (int64_t d = 0; d < D; ++d) gbs[d] = gd[d] = 0.0f;
      for (int64_t n = 0; n < N; ++n) {
        const float bn = B_r[t * N + n], cn = C_r[t * N + n];
        const float* __restrict A_n = A_s + n * D;
        const float* __restrict hp = w.H.data() + k * ND + n * D;
        const float* __restrict dA = w.dA.data() + k * ND + n * D;
        float* __restrict g_n = g + n * D;
        float* __restrict gA_n = gA_r + n * D;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) {
          const float gg = cn * gy_t[d] + g_n[d];  // dL/dh_t
          acc += gg * dt[d] * u_t[d];
          gbs[d] += gg * bn;
          const float r = gg * dA[d] * hp[d];  // g_t dA_t h_{t-1}
          gd[d] += r * A_n[d];
          gA_n[d] += r * dt[d];
          g_n[d] = dA[d] * gg;
        }
        gB_r[t * N + n] = acc;
      }
      float* __restrict gu_t = gu_r + t * D;
      float* __restrict gdelta_t = gdelta_r + t * D;
      if (softplus) SigmoidScalar(pre, D, sig);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const float gdel = (gbs[d] * u_t[d] + gd[d]) * sig[d];
        gu_t[d] = gbs[d] * dt[d] + gy_t[d] * Dk_s[d];
        gdelta_t[d] = gdel;
        gbias_r[d] += gdel;
        gD_r[d] += gy_t[d] * u_t[d];
      }
    }
  }
}

ffi::Error CheckDims(const Dims& m) {
  if (m.S < 1 || m.B < 1 || m.L < 1 || m.D < 1 || m.N < 1 || m.T < 1) {
    return ffi::Error::InvalidArgument("mamba_pkd native scan: empty dimension");
  }
  return ffi::Error::Success();
}

Dims GetDims(const ffi::Buffer<ffi::F32>& u, const ffi::Buffer<ffi::F32>& At, int64_t chunk) {
  auto du = u.dimensions();
  auto da = At.dimensions();
  Dims m{du[0], du[1], du[2], du[3], da[1], chunk, 0};
  m.nc = m.T > 0 ? (m.L + m.T - 1) / m.T : 0;
  return m;
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> delta,
                       ffi::Buffer<ffi::F32> At, ffi::Buffer<ffi::F32> Bm,
                       ffi::Buffer<ffi::F32> Cm, ffi::Buffer<ffi::F32> Dk,
                       ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> hs, int64_t reverse_mask,
                       int64_t softplus, int64_t chunk, int64_t threads) {
  const Dims m = GetDims(u, At, chunk);
  if (auto e = CheckDims(m); e.failure()) return e;
  ParallelRows(m.S * m.B, threads, [&](int64_t row) {
    thread_local std::vector<float> h, pre, dt;
    h.resize(m.N * m.D);
    pre.resize(m.D);
    dt.resize(m.D);
    const int64_t s = row / m.B, b = row % m.B;
    ForwardRow(m, s, b, (reverse_mask >> s) & 1, softplus != 0, u.typed_data(),
               delta.typed_data(), At.typed_data(), Bm.typed_data(), Cm.typed_data(),
               Dk.typed_data(), bias.typed_data(), y->typed_data(), hs->typed_data(),
               h.data(), pre.data(), dt.data());
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> delta,
                        ffi::Buffer<ffi::F32> At, ffi::Buffer<ffi::F32> Bm,
                        ffi::Buffer<ffi::F32> Cm, ffi::Buffer<ffi::F32> Dk,
                        ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> gy,
                        ffi::Buffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> gu,
                        ffi::ResultBuffer<ffi::F32> gdelta, ffi::ResultBuffer<ffi::F32> gB,
                        ffi::ResultBuffer<ffi::F32> gC, ffi::ResultBuffer<ffi::F32> gA,
                        ffi::ResultBuffer<ffi::F32> gD, ffi::ResultBuffer<ffi::F32> gbias,
                        int64_t reverse_mask, int64_t softplus, int64_t chunk,
                        int64_t threads) {
  const Dims m = GetDims(u, At, chunk);
  if (auto e = CheckDims(m); e.failure()) return e;
  ParallelRows(m.S * m.B, threads, [&](int64_t row) {
    thread_local BackwardScratch w;
    w.Resize(m);
    const int64_t s = row / m.B, b = row % m.B;
    BackwardRow(m, s, b, (reverse_mask >> s) & 1, softplus != 0, u.typed_data(),
                delta.typed_data(), At.typed_data(), Bm.typed_data(), Cm.typed_data(),
                Dk.typed_data(), bias.typed_data(), gy.typed_data(), hs.typed_data(),
                gu->typed_data(), gdelta->typed_data(), gB->typed_data(), gC->typed_data(),
                gA->typed_data(), gD->typed_data(), gbias->typed_data(), w);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Causal depthwise convolution + SiLU: the backward.
// ---------------------------------------------------------------------------

// pre[e] = bias[e] + sum_k w[k, e] x[t - K + 1 + k, e] (taps before t = 0 read zeros).
inline void ConvPre(const float* __restrict x_r, const float* __restrict w,
                    const float* __restrict bias, int64_t t, int64_t K, int64_t E,
                    float* __restrict pre) {
  for (int64_t e = 0; e < E; ++e) pre[e] = bias[e];
  for (int64_t k = 0; k < K; ++k) {
    const int64_t src = t - (K - 1) + k;
    if (src < 0) continue;
    const float* __restrict xs = x_r + src * E;
    const float* __restrict wk = w + k * E;
    for (int64_t e = 0; e < E; ++e) pre[e] += wk[e] * xs[e];
  }
}

ffi::Error ConvBackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> gy,
                            ffi::ResultBuffer<ffi::F32> gx, ffi::ResultBuffer<ffi::F32> gw,
                            ffi::ResultBuffer<ffi::F32> gbias, int64_t silu,
                            int64_t threads) {
  auto dx = x.dimensions();
  const int64_t B = dx[0], L = dx[1], E = dx[2], K = w.dimensions()[0];
  if (B < 1 || L < 1 || E < 1 || K < 1) {
    return ffi::Error::InvalidArgument("mamba_pkd native conv: empty dimension");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const float* bp = bias.typed_data();
  const float* gyp = gy.typed_data();
  float* gxp = gx->typed_data();
  float* gwp = gw->typed_data();
  float* gbp = gbias->typed_data();
  ParallelRows(B, threads, [&](int64_t b) {
    thread_local std::vector<float> gpre_buf;
    gpre_buf.resize(L * E);
    float* __restrict gpre = gpre_buf.data();
    const float* x_r = xp + b * L * E;
    const float* gy_r = gyp + b * L * E;
    float* __restrict gx_r = gxp + b * L * E;
    float* __restrict gw_r = gwp + b * K * E;
    float* __restrict gb_r = gbp + b * E;
    // Gradient of the pre-activation: silu'(a) = s (1 + a (1 - s)), s = sigmoid(a).
    for (int64_t t = 0; t < L; ++t) {
      float* __restrict g = gpre + t * E;
      const float* __restrict gy_t = gy_r + t * E;
      ConvPre(x_r, wp, bp, t, K, E, g);
      if (silu) {
        for (int64_t e = 0; e < E; ++e) {
          const float a = g[e], sg = Sigmoid(a);
          g[e] = gy_t[e] * (sg * (1.0f + a * (1.0f - sg)));
        }
      } else {
        for (int64_t e = 0; e < E; ++e) g[e] = gy_t[e];
      }
    }
    for (int64_t e = 0; e < E; ++e) gb_r[e] = 0.0f;
    for (int64_t i = 0; i < K * E; ++i) gw_r[i] = 0.0f;
    for (int64_t t = 0; t < L; ++t) {
      const float* __restrict g = gpre + t * E;
      for (int64_t e = 0; e < E; ++e) gb_r[e] += g[e];
      for (int64_t k = 0; k < K; ++k) {
        const int64_t src = t - (K - 1) + k;
        if (src < 0) continue;
        const float* __restrict xs = x_r + src * E;
        float* __restrict gwk = gw_r + k * E;
        for (int64_t e = 0; e < E; ++e) gwk[e] += xs[e] * g[e];
      }
    }
    // gx_s = sum_k w_k gpre_{s + K - 1 - k} (outputs past L - 1 do not exist).
    for (int64_t src = 0; src < L; ++src) {
      float* __restrict o = gx_r + src * E;
      for (int64_t e = 0; e < E; ++e) o[e] = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t t = src + (K - 1) - k;
        if (t >= L) continue;
        const float* __restrict g = gpre + t * E;
        const float* __restrict wk = wp + k * E;
        for (int64_t e = 0; e < E; ++e) o[e] += wk[e] * g[e];
      }
    }
  });
  return ffi::Error::Success();
}

// The seven inputs both scan handlers take first: u, delta, At, B, C, D, bias.
auto BindInputs() {
  using F32 = ffi::Buffer<ffi::F32>;
  return ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>();
}

// The attributes both scan handlers take last (native.py's _attrs).
template <typename Binding>
auto BindAttrs(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("reverse_mask")
      .template Attr<int64_t>("softplus")
      .template Attr<int64_t>("chunk")
      .template Attr<int64_t>("threads");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaPkdScanForward, ForwardImpl,
                              BindAttrs(BindInputs()
                                            .Ret<ffi::Buffer<ffi::F32>>()    // y
                                            .Ret<ffi::Buffer<ffi::F32>>()));  // hs

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaPkdScanBackward, BackwardImpl,
                              BindAttrs(BindInputs()
                                            .Arg<ffi::Buffer<ffi::F32>>()    // gy
                                            .Arg<ffi::Buffer<ffi::F32>>()    // hs
                                            .Ret<ffi::Buffer<ffi::F32>>()    // gu
                                            .Ret<ffi::Buffer<ffi::F32>>()    // gdelta
                                            .Ret<ffi::Buffer<ffi::F32>>()    // gB
                                            .Ret<ffi::Buffer<ffi::F32>>()    // gC
                                            .Ret<ffi::Buffer<ffi::F32>>()    // gA
                                            .Ret<ffi::Buffer<ffi::F32>>()    // gD
                                            .Ret<ffi::Buffer<ffi::F32>>()));  // gbias

XLA_FFI_DEFINE_HANDLER_SYMBOL(MambaPkdConvBackward, ConvBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gw
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gbias
                                  .Attr<int64_t>("silu")
                                  .Attr<int64_t>("threads"));
