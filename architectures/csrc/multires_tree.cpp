// MultiresConv's wavelet tree on the CPU, forward and backward (nucleo.architectures.cpu_ops).
//
// Per channel row x [L] (x: [rows = B * D, L], channel c = row % D), with filters h0, h1 [D, K]
// and weights w [D, J + 2] (columns: w_0 for the last low-pass, w_1..w_J, w_skip):
//
//     low_0 = x;  at level i (dilation 2^i, weight column J - i), tap k reads shift (K-1-k) 2^i:
//     high_i[t]    = sum_k h1[k] low_i[t - shift_k]      (zero before the start: causal)
//     low_{i+1}[t] = sum_k h0[k] low_i[t - shift_k]
//     y = w_skip x + sum_i w_{J-i} high_i + w_0 low_J
//
// One task per row: the row and its levels stay in cache for the whole tree (PyTorch's version
// makes about 2K passes over [B, D, L] per level). Backward recomputes the levels of its row.
// Filter and weight gradients are written per row ([rows, ...]) and summed over the batch in
// PyTorch, so results do not depend on the number of threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

// lows: (J + 1) rows of L, lows[0] = x; fills lows[1..J] and, when y, the output
template <typename T>
void levels(const T* x, const T* h0, const T* h1, const T* w, T* lows, T* y, T* high,
            int64_t L, int64_t K, int64_t J) {
  std::copy(x, x + L, lows);
  if (y != nullptr) {
    const T skip = w[J + 1];
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) y[t] = skip * x[t];
  }
  int64_t dil = 1;
  for (int64_t i = 0; i < J; ++i, dil *= 2) {
    const T* low = lows + i * L;
    T* next = lows + (i + 1) * L;
    std::fill(next, next + L, T(0));
    std::fill(high, high + L, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const int64_t shift = (K - 1 - k) * dil;
      if (shift >= L) continue;
      const T a = h0[k], b = h1[k];
#pragma omp simd
      for (int64_t t = shift; t < L; ++t) {
        next[t] += a * low[t - shift];
        high[t] += b * low[t - shift];
      }
    }
    if (y != nullptr) {
      const T wl = w[J - i];
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) y[t] += wl * high[t];
    }
  }
  if (y != nullptr) {
    const T* last = lows + J * L;
    const T w0 = w[0];
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) y[t] += w0 * last[t];
  }
}

template <typename T>
void forward_kernel(const T* x, const T* h0, const T* h1, const T* w, T* y, int64_t rows,
                    int64_t D, int64_t L, int64_t K, int64_t J) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> lows((J + 1) * L), high(L);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r % D;
      levels<T>(x + r * L, h0 + c * K, h1 + c * K, w + c * (J + 2), lows.data(), y + r * L,
                high.data(), L, K, J);
    }
  });
}

template <typename T>
void backward_kernel(const T* x, const T* h0, const T* h1, const T* w, const T* gy, T* gx,
                     T* dh0, T* dh1, T* dw, int64_t rows, int64_t D, int64_t L, int64_t K,
                     int64_t J) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> lows((J + 1) * L), high(L), g_low(L), g_prev(L), g_high(L);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r % D;
      const T* hc0 = h0 + c * K;
      const T* hc1 = h1 + c * K;
      const T* wc = w + c * (J + 2);
      const T* xr = x + r * L;
      const T* gr = gy + r * L;
      T* dh0r = dh0 + r * K;
      T* dh1r = dh1 + r * K;
      T* dwr = dw + r * (J + 2);
      levels<T>(xr, hc0, hc1, wc, lows.data(), nullptr, high.data(), L, K, J);
      const T* last = lows.data() + J * L;
      T acc = T(0);
      const T w0 = wc[0];
#pragma omp simd reduction(+ : acc)
      for (int64_t t = 0; t < L; ++t) {
        acc += gr[t] * last[t];
        g_low[t] = w0 * gr[t];
      }
      dwr[0] = acc;
      for (int64_t k = 0; k < K; ++k) dh0r[k] = dh1r[k] = T(0);
      for (int64_t i = J - 1; i >= 0; --i) {
        const int64_t dil = int64_t(1) << i;
        const T* low = lows.data() + i * L;
        const T wl = wc[J - i];
        // high_i again, for w's gradient
        std::fill(high.begin(), high.end(), T(0));
        for (int64_t k = 0; k < K; ++k) {
          const int64_t shift = (K - 1 - k) * dil;
          if (shift >= L) continue;
          const T b = hc1[k];
          T* hi = high.data();
#pragma omp simd
          for (int64_t t = shift; t < L; ++t) hi[t] += b * low[t - shift];
        }
        acc = T(0);
        const T* hi = high.data();
        T* gh = g_high.data();
#pragma omp simd reduction(+ : acc)
        for (int64_t t = 0; t < L; ++t) {
          acc += gr[t] * hi[t];
          gh[t] = wl * gr[t];
        }
        dwr[J - i] = acc;
        std::fill(g_prev.begin(), g_prev.end(), T(0));
        for (int64_t k = 0; k < K; ++k) {
          const int64_t shift = (K - 1 - k) * dil;
          if (shift >= L) continue;
          const T a = hc0[k], b = hc1[k];
          T s0 = T(0), s1 = T(0);
          T* gp = g_prev.data();
          const T* gl = g_low.data();
#pragma omp simd reduction(+ : s0, s1)
          for (int64_t t = shift; t < L; ++t) {
            gp[t - shift] += a * gl[t] + b * gh[t];
            s0 += gl[t] * low[t - shift];
            s1 += gh[t] * low[t - shift];
          }
          dh0r[k] += s0;
          dh1r[k] += s1;
        }
        std::swap(g_low, g_prev);
      }
      const T skip = wc[J + 1];
      T* gxr = gx + r * L;
      acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t t = 0; t < L; ++t) {
        acc += gr[t] * xr[t];
        gxr[t] = g_low[t] + skip * gr[t];
      }
      dwr[J + 1] = acc;
    }
  });
}

void check(const torch::Tensor& t, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(),
              name, " must be a contiguous CPU tensor of ", like.scalar_type());
}

// x: [B, D, L]; h0, h1: [D, K]; w: [D, J + 2] -> y [B, D, L]
torch::Tensor forward(torch::Tensor x, torch::Tensor h0, torch::Tensor h1, torch::Tensor w) {
  for (auto [t, name] : {std::pair{h0, "h0"}, {h1, "h1"}, {w, "w"}}) check(t, name, x);
  check(x, "x", x);
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), K = h0.size(1);
  const int64_t J = w.size(1) - 2;
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multires_tree_forward", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                             h1.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                             y.data_ptr<scalar_t>(), B * D, D, L, K, J);
  });
  return y;
}

// -> (gx [B, D, L], dh0, dh1 [D, K], dw [D, J + 2])
std::vector<torch::Tensor> backward(torch::Tensor x, torch::Tensor h0, torch::Tensor h1,
                                    torch::Tensor w, torch::Tensor gy) {
  for (auto [t, name] : {std::pair{h0, "h0"}, {h1, "h1"}, {w, "w"}, {gy, "gy"}})
    check(t, name, x);
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2), K = h0.size(1);
  const int64_t J = w.size(1) - 2;
  auto gx = torch::empty_like(x);
  auto dh0 = torch::empty({B, D, K}, x.options()), dh1 = torch::empty({B, D, K}, x.options());
  auto dw = torch::empty({B, D, J + 2}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multires_tree_backward", [&] {
    backward_kernel<scalar_t>(x.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                              h1.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                              gy.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
                              dh0.data_ptr<scalar_t>(), dh1.data_ptr<scalar_t>(),
                              dw.data_ptr<scalar_t>(), B * D, D, L, K, J);
  });
  return {gx, dh0.sum(0), dh1.sum(0), dw.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "multires wavelet tree, forward (CPU)");
  m.def("backward", &backward, "multires wavelet tree, backward (CPU)");
}
