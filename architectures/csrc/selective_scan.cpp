// Mamba's mixer on the CPU: the selective scan and the causal depthwise conv + silu, forward and
// backward (built by nucleo's architectures.cpu_ops; used by architectures.selective_scan).
//
// Selective scan, per batch row (h: [n, d], t in scan order):
//
//     dt_t = softplus(delta_t + bias)                       (bias and softplus optional)
//     h_t  = exp(dt_t * A) * h_{t-1} + dt_t * x_t * B_t
//     y_t  = (sum_n C_t h_t + D * x_t) * silu(z_t)         (D and z optional)
//
// Layouts are channels last, so every inner loop runs over contiguous channels and vectorises:
// delta, x, z: [b, L, d] with any batch and position strides (channels contiguous), so slices of
// a projection's output go in without copies; A: [n, d]; B, C: [b, L, n] (any batch and position
// strides). `reverse` walks positions from L - 1 down to 0 (BiMamba's second direction without
// flipping tensors). Outputs are contiguous [b, L, d] in position order.
//
// Work is split into tasks of (batch row, block of dblk channels), run in parallel; each task
// walks the positions in order with its state [n, dblk] in cache. Forward saves the state at the
// start of every chunk of `chunk` positions ([b, chunks, n, d]); backward recomputes a chunk's
// states (and step sizes) from it, then runs the reverse recurrence for dL/dh, so memory is
// O(b d L + b d n L / chunk). Sums over channels (dB, dC) are written per channel block and sums
// over batch rows (dA, dD, dbias) per row; the caller adds them, so results do not depend on
// the number of threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// A [b, L, width] view: element (bi, pos, j) at p[bi * sb + pos * sl + j].
template <typename T>
struct Rows {
  T* p;
  int64_t sb, sl;
  T* at(int64_t bi, int64_t pos) const { return p + bi * sb + pos * sl; }
};

template <typename T>
Rows<T> rows(const torch::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

// exp inlined into the vector loops (a call into libm's vector exp spills the loop's
// registers): 2^x = 2^i 2^f, i = round(x), |f| <= 1/2, 2^f by Cephes' exp2f polynomial
// (relative error ~2e-7 in float32). Arguments below -126 log 2 give 0, as the state's decays
// should. double keeps std::exp (the float64 gradient checks).
inline float fast_exp(float x) {
  const float t = std::max(x * 1.44269504088896341f, -126.0f);
  const float i = std::floor(t + 0.5f);
  const float f = t - i;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(i) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline double fast_exp(double x) { return std::exp(x); }

template <typename T>
inline T softplus(T v) {
  return v > T(20) ? v : std::log1p(std::exp(v));
}

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

struct Shape {
  int64_t b, L, d, n, chunk, dblk;
  bool reverse;
  int64_t pos(int64_t t) const { return reverse ? L - 1 - t : t; }
  int64_t blocks() const { return (d + dblk - 1) / dblk; }
  int64_t chunks() const { return (L + chunk - 1) / chunk; }
};

template <typename T>
struct ScanArgs {
  Rows<T> delta, x, z, B, C;  // z.p null: no gate
  const T *A, *D, *bias;      // D, bias null: absent
  bool softplus;
};

// dt for one position of one task: dst[j] = softplus(delta + bias) (or without either).
template <typename T>
inline void step_sizes(const ScanArgs<T>& a, const T* delta_t, int64_t d0, int64_t w, T* dst) {
  const T* bias = a.bias ? a.bias + d0 : nullptr;
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) {
    const T v = delta_t[j] + (bias ? bias[j] : T(0));
    dst[j] = a.softplus ? softplus(v) : v;
  }
}

template <typename T>
void scan_forward(const ScanArgs<T>& a, const Shape& s, T* out, T* states) {
  const int64_t blocks = s.blocks(), chunks = s.chunks(), n = s.n, dblk = s.dblk, d = s.d;
  at::parallel_for(0, s.b * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> h(n * dblk), dt(dblk), u(dblk), acc(dblk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / blocks, d0 = (task % blocks) * dblk;
      const int64_t w = std::min(dblk, d - d0);
      std::fill(h.begin(), h.end(), T(0));
      for (int64_t t = 0; t < s.L; ++t) {
        if (t % s.chunk == 0) {
          T* saved = states + ((bi * chunks + t / s.chunk) * n) * d + d0;
          for (int64_t k = 0; k < n; ++k)
            std::copy(h.data() + k * dblk, h.data() + k * dblk + w, saved + k * d);
        }
        const int64_t p = s.pos(t);
        step_sizes(a, a.delta.at(bi, p) + d0, d0, w, dt.data());
        const T* x_t = a.x.at(bi, p) + d0;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
          u[j] = dt[j] * x_t[j];
          acc[j] = a.D ? a.D[d0 + j] * x_t[j] : T(0);
        }
        const T* B_t = a.B.at(bi, p);
        const T* C_t = a.C.at(bi, p);
        for (int64_t k = 0; k < n; ++k) {
          const T* A_k = a.A + k * d + d0;
          T* h_k = h.data() + k * dblk;
          const T b_k = B_t[k], c_k = C_t[k];
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            const T v = fast_exp(dt[j] * A_k[j]) * h_k[j] + u[j] * b_k;
            h_k[j] = v;
            acc[j] += c_k * v;
          }
        }
        T* y_t = out + (bi * s.L + p) * d + d0;
        if (a.z.p) {
          const T* z_t = a.z.at(bi, p) + d0;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) y_t[j] = acc[j] * z_t[j] * sigmoid(z_t[j]);
        } else {
          std::copy(acc.begin(), acc.begin() + w, y_t);
        }
      }
    }
  });
}

template <typename T>
struct ScanGrads {
  T *ddelta, *dx, *dz;  // [b, L, d]; dz null without a gate
  T *dA, *dD, *dbias;   // per batch row: [b, n, d], [b, d], [b, d]
  T *dB, *dC;           // per channel block: [blocks, b, L, n]
};

template <typename T>
void scan_backward(const ScanArgs<T>& a, const Shape& s, const T* states, Rows<T> dout,
                   const ScanGrads<T>& g) {
  const int64_t blocks = s.blocks(), chunks = s.chunks(), n = s.n, dblk = s.dblk, d = s.d;
  const int64_t L = s.L;
  at::parallel_for(0, s.b * blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t plane = n * dblk;  // one position's states in hs
    std::vector<T> hs((s.chunk + 1) * plane), dts(s.chunk * dblk), carry(plane), dA(plane);
    std::vector<T> dD(dblk), dbias(dblk), dy(dblk), sg(dblk), y(dblk), g_u(dblk), g_dt(dblk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / blocks, blk = task % blocks, d0 = blk * dblk;
      const int64_t w = std::min(dblk, d - d0);
      std::fill(carry.begin(), carry.end(), T(0));  // a_{t+1} dL/dh_{t+1}
      std::fill(dA.begin(), dA.end(), T(0));
      std::fill(dD.begin(), dD.end(), T(0));
      std::fill(dbias.begin(), dbias.end(), T(0));
      for (int64_t c = chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * s.chunk, t1 = std::min(L, t0 + s.chunk);
        // recompute the chunk: hs[0] the state before it, hs[i + 1] after t0 + i; dts[i] its dt
        const T* saved = states + ((bi * chunks + c) * n) * d + d0;
        for (int64_t k = 0; k < n; ++k)
          std::copy(saved + k * d, saved + k * d + w, hs.data() + k * dblk);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t p = s.pos(t);
          T* dt = dts.data() + (t - t0) * dblk;
          step_sizes(a, a.delta.at(bi, p) + d0, d0, w, dt);
          const T* x_t = a.x.at(bi, p) + d0;
          const T* B_t = a.B.at(bi, p);
          const T* prev = hs.data() + (t - t0) * plane;
          T* next = hs.data() + (t - t0 + 1) * plane;
          for (int64_t k = 0; k < n; ++k) {
            const T* A_k = a.A + k * d + d0;
            const T b_k = B_t[k];
#pragma omp simd
            for (int64_t j = 0; j < w; ++j)
              next[k * dblk + j] =
                  fast_exp(dt[j] * A_k[j]) * prev[k * dblk + j] + dt[j] * x_t[j] * b_k;
          }
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t p = s.pos(t);
          const T* dt = dts.data() + (t - t0) * dblk;
          const T* x_t = a.x.at(bi, p) + d0;
          const T* o_t = dout.at(bi, p) + d0;
          const T* z_t = a.z.p ? a.z.at(bi, p) + d0 : nullptr;
          const T* B_t = a.B.at(bi, p);
          const T* C_t = a.C.at(bi, p);
          const T* prev = hs.data() + (t - t0) * plane;
          const T* cur = hs.data() + (t - t0 + 1) * plane;
          T* dB_t = g.dB + ((blk * s.b + bi) * L + p) * n;
          T* dC_t = g.dC + ((blk * s.b + bi) * L + p) * n;
          if (z_t) {
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) {
              sg[j] = sigmoid(z_t[j]);
              dy[j] = o_t[j] * z_t[j] * sg[j];  // dL/dy before the gate
            }
          } else {
            std::copy(o_t, o_t + w, dy.data());
          }
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            y[j] = a.D ? a.D[d0 + j] * x_t[j] : T(0);
            g_u[j] = T(0);  // dL/d(dt x)
            g_dt[j] = T(0);
          }
          for (int64_t k = 0; k < n; ++k) {
            const T* A_k = a.A + k * d + d0;
            const T b_k = B_t[k], c_k = C_t[k];
            T* carry_k = carry.data() + k * dblk;
            T* dA_k = dA.data() + k * dblk;
            const T* prev_k = prev + k * dblk;
            const T* cur_k = cur + k * dblk;
            T sum_b = T(0), sum_c = T(0);
#pragma omp simd reduction(+ : sum_b, sum_c)
            for (int64_t j = 0; j < w; ++j) {
              const T decay = fast_exp(dt[j] * A_k[j]);
              const T gh = carry_k[j] + c_k * dy[j];  // dL/dh_t
              y[j] += c_k * cur_k[j];
              sum_c += dy[j] * cur_k[j];
              sum_b += gh * dt[j] * x_t[j];
              g_u[j] += gh * b_k;
              const T G = gh * decay * prev_k[j];  // dL/d(dt A)
              dA_k[j] += G * dt[j];
              g_dt[j] += G * A_k[j];
              carry_k[j] = decay * gh;
            }
            dB_t[k] = sum_b;
            dC_t[k] = sum_c;
          }
          const int64_t row = (bi * L + p) * d + d0;
          T* ddelta_t = g.ddelta + row;
          T* dx_t = g.dx + row;
          const T* delta_t = a.delta.at(bi, p) + d0;
          const T* bias = a.bias ? a.bias + d0 : nullptr;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            dx_t[j] = g_u[j] * dt[j] + (a.D ? a.D[d0 + j] * dy[j] : T(0));
            dD[j] += dy[j] * x_t[j];
            T gd = g_dt[j] + g_u[j] * x_t[j];  // dL/d(dt)
            if (a.softplus) gd *= sigmoid(delta_t[j] + (bias ? bias[j] : T(0)));  // softplus'
            ddelta_t[j] = gd;
            dbias[j] += gd;
          }
          if (z_t) {
            T* dz_t = g.dz + row;
#pragma omp simd
            for (int64_t j = 0; j < w; ++j)  // silu'(z) = sg (1 + z (1 - sg))
              dz_t[j] = o_t[j] * y[j] * sg[j] * (T(1) + z_t[j] * (T(1) - sg[j]));
          }
        }
      }
      for (int64_t k = 0; k < n; ++k)
        std::copy(dA.data() + k * dblk, dA.data() + k * dblk + w, g.dA + (bi * n + k) * d + d0);
      std::copy(dD.begin(), dD.begin() + w, g.dD + bi * d + d0);
      std::copy(dbias.begin(), dbias.begin() + w, g.dbias + bi * d + d0);
    }
  });
}

void check(const torch::Tensor& t, const char* name, const torch::Tensor& like, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == like.scalar_type() && t.dim() == dims &&
                  t.stride(-1) == 1,
              name, " must be a ", dims, "-d CPU tensor of ", like.scalar_type(),
              " with its last dimension contiguous");
}

template <typename T>
ScanArgs<T> scan_args(const torch::Tensor& delta, const torch::Tensor& x, const torch::Tensor& z,
                      const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& C,
                      const torch::Tensor& D, const torch::Tensor& bias, bool softplus) {
  ScanArgs<T> a{rows<T>(delta), rows<T>(x), {nullptr, 0, 0}, rows<T>(B), rows<T>(C),
                A.data_ptr<T>(), nullptr, nullptr, softplus};
  if (z.numel()) a.z = rows<T>(z);
  if (D.numel()) a.D = D.data_ptr<T>();
  if (bias.numel()) a.bias = bias.data_ptr<T>();
  return a;
}

Shape scan_shape(const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& delta,
                 const torch::Tensor& z, const torch::Tensor& B, const torch::Tensor& C,
                 const torch::Tensor& D, const torch::Tensor& bias, int64_t chunk, int64_t dblk,
                 bool reverse) {
  check(x, "x", x, 3);
  check(delta, "delta", x, 3);
  check(B, "B", x, 3);
  check(C, "C", x, 3);
  check(A, "A", x, 2);
  TORCH_CHECK(A.is_contiguous(), "A must be contiguous [n, d]");
  const int64_t b = x.size(0), L = x.size(1), d = x.size(2), n = A.size(0);
  TORCH_CHECK(delta.sizes() == x.sizes() && A.size(1) == d, "need delta [b, L, d], A [n, d]");
  TORCH_CHECK(B.size(0) == b && B.size(1) == L && B.size(2) == n && C.sizes() == B.sizes(),
              "need B, C [b, L, n]");
  if (z.numel()) {
    check(z, "z", x, 3);
    TORCH_CHECK(z.sizes() == x.sizes(), "need z [b, L, d]");
  }
  for (auto [t, name] : {std::pair{D, "D"}, {bias, "delta_bias"}})
    if (t.numel()) TORCH_CHECK(t.is_contiguous() && t.numel() == d, name, " must be [d]");
  TORCH_CHECK(chunk >= 1 && dblk >= 1, "chunk and dblk must be >= 1");
  return {b, L, d, n, chunk, dblk, reverse};
}

// delta, x, z: [b, L, d]; A: [n, d]; B, C: [b, L, n]; D, bias: [d]; z, D, bias may be empty.
// -> (out [b, L, d], states [b, chunks, n, d])
std::vector<torch::Tensor> forward(torch::Tensor delta, torch::Tensor x, torch::Tensor z,
                                   torch::Tensor A, torch::Tensor B, torch::Tensor C,
                                   torch::Tensor D, torch::Tensor bias, bool softplus,
                                   bool reverse, int64_t chunk, int64_t dblk) {
  const Shape s = scan_shape(x, A, delta, z, B, C, D, bias, chunk, dblk, reverse);
  auto out = torch::empty({s.b, s.L, s.d}, x.options());
  auto states = torch::empty({s.b, s.chunks(), s.n, s.d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "selective_scan_forward", [&] {
    scan_forward<scalar_t>(scan_args<scalar_t>(delta, x, z, A, B, C, D, bias, softplus), s,
                           out.data_ptr<scalar_t>(), states.data_ptr<scalar_t>());
  });
  return {out, states};
}

// -> (ddelta, dx, dz [b, L, d] (dz empty without z), dA [n, d], dB, dC [b, L, n],
//     dD [d], dbias [d])
std::vector<torch::Tensor> backward(torch::Tensor delta, torch::Tensor x, torch::Tensor z,
                                    torch::Tensor A, torch::Tensor B, torch::Tensor C,
                                    torch::Tensor D, torch::Tensor bias, bool softplus,
                                    bool reverse, int64_t chunk, int64_t dblk,
                                    torch::Tensor states, torch::Tensor dout) {
  const Shape s = scan_shape(x, A, delta, z, B, C, D, bias, chunk, dblk, reverse);
  check(dout, "dout", x, 3);
  TORCH_CHECK(dout.sizes() == x.sizes(), "need dout [b, L, d]");
  TORCH_CHECK(states.is_contiguous() && states.size(1) == s.chunks(), "states do not match");
  auto o = x.options();
  auto ddelta = torch::empty({s.b, s.L, s.d}, o), dx = torch::empty({s.b, s.L, s.d}, o);
  auto dz = z.numel() ? torch::empty({s.b, s.L, s.d}, o) : torch::empty({0}, o);
  auto dA = torch::empty({s.b, s.n, s.d}, o);
  auto dD = torch::empty({s.b, s.d}, o), dbias = torch::empty({s.b, s.d}, o);
  auto dB = torch::empty({s.blocks(), s.b, s.L, s.n}, o);
  auto dC = torch::empty({s.blocks(), s.b, s.L, s.n}, o);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "selective_scan_backward", [&] {
    using T = scalar_t;
    ScanGrads<T> g{ddelta.data_ptr<T>(), dx.data_ptr<T>(),
                   z.numel() ? dz.data_ptr<T>() : nullptr,
                   dA.data_ptr<T>(), dD.data_ptr<T>(), dbias.data_ptr<T>(),
                   dB.data_ptr<T>(), dC.data_ptr<T>()};
    scan_backward<T>(scan_args<T>(delta, x, z, A, B, C, D, bias, softplus), s,
                     states.data_ptr<T>(), rows<T>(dout), g);
  });
  return {ddelta, dx, dz, dA.sum(0), dB.sum(0), dC.sum(0), dD.sum(0), dbias.sum(0)};
}

// Causal depthwise conv + silu, channels last: out[p] = silu(bias + sum_k w[k] x[p - (K-1-k)])
// in scan order (with `reverse`, "earlier" means later positions). x: [b, L, d] (any batch and
// position strides), wt: [K, d] (the weight transposed), bias: [d]. One task per batch row.
template <typename T>
inline void conv_pre(Rows<T> x, const T* wt, const T* bias, const Shape& s, int64_t K,
                     int64_t bi, int64_t t, T* acc) {
  const int64_t d = s.d;
  std::copy(bias, bias + d, acc);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t src = t - (K - 1 - k);
    if (src < 0) continue;
    const T* x_s = x.at(bi, s.pos(src));
    const T* w_k = wt + k * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) acc[j] += w_k[j] * x_s[j];
  }
}

template <typename T>
void conv_forward_kernel(Rows<T> x, const T* wt, const T* bias, const Shape& s, int64_t K,
                         T* out) {
  at::parallel_for(0, s.b, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(s.d);
    for (int64_t bi = begin; bi < end; ++bi)
      for (int64_t t = 0; t < s.L; ++t) {
        conv_pre(x, wt, bias, s, K, bi, t, acc.data());
        T* o_t = out + (bi * s.L + s.pos(t)) * s.d;
#pragma omp simd
        for (int64_t j = 0; j < s.d; ++j) o_t[j] = acc[j] * sigmoid(acc[j]);
      }
  });
}

// dx: [b, L, d], dwt: [b, K, d], dbias: [b, d], zero on entry (per batch row; summed by the caller)
template <typename T>
void conv_backward_kernel(Rows<T> x, const T* wt, const T* bias, const Shape& s, int64_t K,
                          Rows<T> dout, T* dx, T* dwt, T* dbias) {
  const int64_t d = s.d;
  at::parallel_for(0, s.b, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> g(d);
    for (int64_t bi = begin; bi < end; ++bi)
      for (int64_t t = 0; t < s.L; ++t) {
        conv_pre(x, wt, bias, s, K, bi, t, g.data());
        const T* o_t = dout.at(bi, s.pos(t));
        T* gb = dbias + bi * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {  // g := dL/d(pre-activation)
          const T sg = sigmoid(g[j]);
          g[j] = o_t[j] * sg * (T(1) + g[j] * (T(1) - sg));
          gb[j] += g[j];
        }
        for (int64_t k = 0; k < K; ++k) {
          const int64_t src = t - (K - 1 - k);
          if (src < 0) continue;
          const int64_t p = s.pos(src);
          const T* x_s = x.at(bi, p);
          const T* w_k = wt + k * d;
          T* dx_s = dx + (bi * s.L + p) * d;
          T* dw_k = dwt + (bi * K + k) * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) {
            dx_s[j] += w_k[j] * g[j];
            dw_k[j] += x_s[j] * g[j];
          }
        }
      }
  });
}

void check_conv(const torch::Tensor& x, const torch::Tensor& wt, const torch::Tensor& bias) {
  check(x, "x", x, 3);
  TORCH_CHECK(wt.is_contiguous() && wt.dim() == 2 && wt.size(1) == x.size(2) &&
                  bias.is_contiguous() && bias.numel() == x.size(2) &&
                  wt.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(),
              "need wt [K, d] and bias [d] of x's type");
}

// x: [b, L, d] (any batch and position strides), wt: [K, d], bias: [d] -> [b, L, d]
torch::Tensor conv_forward(torch::Tensor x, torch::Tensor wt, torch::Tensor bias,
                           bool reverse) {
  check_conv(x, wt, bias);
  const Shape s{x.size(0), x.size(1), x.size(2), 0, 1, 1, reverse};
  auto out = torch::empty({s.b, s.L, s.d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_forward", [&] {
    conv_forward_kernel<scalar_t>(rows<scalar_t>(x), wt.data_ptr<scalar_t>(),
                                  bias.data_ptr<scalar_t>(), s, wt.size(0),
                                  out.data_ptr<scalar_t>());
  });
  return out;
}

// -> (dx [b, L, d], dwt [K, d], dbias [d]); dout: [b, L, d] (any batch and position strides)
std::vector<torch::Tensor> conv_backward(torch::Tensor x, torch::Tensor wt, torch::Tensor bias,
                                         bool reverse, torch::Tensor dout) {
  check_conv(x, wt, bias);
  check(dout, "dout", x, 3);
  TORCH_CHECK(dout.sizes() == x.sizes(), "need dout [b, L, d]");
  const Shape s{x.size(0), x.size(1), x.size(2), 0, 1, 1, reverse};
  const int64_t K = wt.size(0);
  auto dx = torch::zeros({s.b, s.L, s.d}, x.options());
  auto dwt = torch::zeros({s.b, K, s.d}, x.options());
  auto dbias = torch::zeros({s.b, s.d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_backward", [&] {
    using T = scalar_t;
    conv_backward_kernel<T>(rows<T>(x), wt.data_ptr<T>(), bias.data_ptr<T>(), s, K,
                            rows<T>(dout), dx.data_ptr<T>(), dwt.data_ptr<T>(),
                            dbias.data_ptr<T>());
  });
  return {dx, dwt.sum(0), dbias.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan, forward (CPU, channels last)");
  m.def("backward", &backward, "selective scan, backward (CPU, channels last)");
  m.def("conv_forward", &conv_forward, "causal depthwise conv + silu, forward (CPU)");
  m.def("conv_backward", &conv_backward, "causal depthwise conv + silu, backward (CPU)");
}
