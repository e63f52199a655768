// The selective scan's recurrence on the CPU, forward and backward (nucleo.architectures.cpu_ops).
//
// Everything elementwise (softplus, D * u, the silu gate) stays in PyTorch; this file holds only
// the part that is n times the work of the rest: the state recurrence
//
//     h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t * B_t        h: [n, d] per batch row
//     y_t = sum_n C_t h_t
//
// Layouts (all contiguous, one floating type): dt, x, y, dy, ddt, dx: [b, L, d] (channels
// innermost, so the loops vectorise over d); A: [n, d]; B, C: [b, L, n].
// Work is split into tasks of (batch row, block of dblk channels), run in parallel. Each task
// walks the positions in order with its state [n, dblk] in cache. Forward saves the state at the
// start of every chunk of `chunk` positions ([b, chunks, n, d]); backward recomputes a chunk's
// states from it, then runs the reverse recurrence for dL/dh, so memory is O(b d n L / chunk).
// The sums over channels (dB, dC) are written per channel block and added in PyTorch, so results
// do not depend on the number of threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
void forward_kernel(const T* dt, const T* x, const T* A, const T* B, const T* C, T* y,
                    T* states, int64_t b, int64_t L, int64_t d, int64_t n, int64_t chunk,
                    int64_t dblk) {
  const int64_t blocks = (d + dblk - 1) / dblk;
  const int64_t chunks = (L + chunk - 1) / chunk;
  at::parallel_for(0, b * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> h(n * dblk), dtx(dblk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / blocks, d0 = (task % blocks) * dblk;
      const int64_t w = std::min(dblk, d - d0);
      std::fill(h.begin(), h.end(), T(0));
      for (int64_t t = 0; t < L; ++t) {
        if (t % chunk == 0) {
          T* saved = states + ((bi * chunks + t / chunk) * n) * d + d0;
          for (int64_t k = 0; k < n; ++k)
            std::copy(h.data() + k * dblk, h.data() + k * dblk + w, saved + k * d);
        }
        const int64_t row = (bi * L + t) * d + d0;
        const T* dt_t = dt + row;
        const T* x_t = x + row;
        T* y_t = y + row;
        const T* B_t = B + (bi * L + t) * n;
        const T* C_t = C + (bi * L + t) * n;
        T* u = dtx.data();
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
          u[j] = dt_t[j] * x_t[j];
          y_t[j] = T(0);
        }
        for (int64_t k = 0; k < n; ++k) {
          const T* A_k = A + k * d + d0;
          T* h_k = h.data() + k * dblk;
          const T b_k = B_t[k], c_k = C_t[k];
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            const T s = std::exp(dt_t[j] * A_k[j]) * h_k[j] + u[j] * b_k;
            h_k[j] = s;
            y_t[j] += c_k * s;
          }
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* dt, const T* x, const T* A, const T* B, const T* C,
                     const T* states, const T* dy, T* ddt, T* dx, T* dA, T* dB, T* dC,
                     int64_t b, int64_t L, int64_t d, int64_t n, int64_t chunk, int64_t dblk) {
  // dA: [b, n, d] (summed over b by the caller); dB, dC: [blocks, b, L, n] (summed over blocks)
  const int64_t blocks = (d + dblk - 1) / dblk;
  const int64_t chunks = (L + chunk - 1) / chunk;
  at::parallel_for(0, b * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> hs((chunk + 1) * n * dblk), carry(n * dblk), dA_acc(n * dblk);
    std::vector<T> dtx(dblk), g_dtx(dblk), g_dt(dblk);
    const int64_t plane = n * dblk;  // one position's states in hs
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / blocks, blk = task % blocks, d0 = blk * dblk;
      const int64_t w = std::min(dblk, d - d0);
      std::fill(carry.begin(), carry.end(), T(0));  // a_{t+1} dL/dh_{t+1}
      std::fill(dA_acc.begin(), dA_acc.end(), T(0));
      for (int64_t c = chunks - 1; c >= 0; --c) {
        const int64_t s = c * chunk, e = std::min(L, s + chunk);
        // recompute the chunk's states: hs[0] the state before it, hs[i + 1] after s + i
        const T* saved = states + ((bi * chunks + c) * n) * d + d0;
        for (int64_t k = 0; k < n; ++k)
          std::copy(saved + k * d, saved + k * d + w, hs.data() + k * dblk);
        for (int64_t t = s; t < e; ++t) {
          const int64_t row = (bi * L + t) * d + d0;
          const T* dt_t = dt + row;
          const T* x_t = x + row;
          const T* B_t = B + (bi * L + t) * n;
          const T* prev = hs.data() + (t - s) * plane;
          T* next = hs.data() + (t - s + 1) * plane;
          for (int64_t k = 0; k < n; ++k) {
            const T* A_k = A + k * d + d0;
            const T b_k = B_t[k];
#pragma omp simd
            for (int64_t j = 0; j < w; ++j)
              next[k * dblk + j] =
                  std::exp(dt_t[j] * A_k[j]) * prev[k * dblk + j] + dt_t[j] * x_t[j] * b_k;
          }
        }
        for (int64_t t = e - 1; t >= s; --t) {
          const int64_t row = (bi * L + t) * d + d0;
          const T* dt_t = dt + row;
          const T* x_t = x + row;
          const T* dy_t = dy + row;
          const T* B_t = B + (bi * L + t) * n;
          const T* C_t = C + (bi * L + t) * n;
          const T* prev = hs.data() + (t - s) * plane;
          const T* cur = hs.data() + (t - s + 1) * plane;
          T* dB_t = dB + ((blk * b + bi) * L + t) * n;
          T* dC_t = dC + ((blk * b + bi) * L + t) * n;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            dtx[j] = dt_t[j] * x_t[j];
            g_dtx[j] = T(0);
            g_dt[j] = T(0);
          }
          for (int64_t k = 0; k < n; ++k) {
            const T* A_k = A + k * d + d0;
            const T b_k = B_t[k], c_k = C_t[k];
            T* carry_k = carry.data() + k * dblk;
            T* dA_k = dA_acc.data() + k * dblk;
            const T* prev_k = prev + k * dblk;
            const T* cur_k = cur + k * dblk;
            T sum_b = T(0), sum_c = T(0);
#pragma omp simd reduction(+ : sum_b, sum_c)
            for (int64_t j = 0; j < w; ++j) {
              const T a = std::exp(dt_t[j] * A_k[j]);
              const T g = carry_k[j] + c_k * dy_t[j];  // dL/dh_t
              sum_c += dy_t[j] * cur_k[j];
              sum_b += g * dtx[j];
              g_dtx[j] += g * b_k;
              const T G = g * a * prev_k[j];  // dL/d(dt A)
              dA_k[j] += G * dt_t[j];
              g_dt[j] += G * A_k[j];
              carry_k[j] = a * g;
            }
            dB_t[k] = sum_b;
            dC_t[k] = sum_c;
          }
          T* ddt_t = ddt + row;
          T* dx_t = dx + row;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            ddt_t[j] = g_dt[j] + g_dtx[j] * x_t[j];
            dx_t[j] = g_dtx[j] * dt_t[j];
          }
        }
      }
      T* dA_b = dA + bi * n * d + d0;
      for (int64_t k = 0; k < n; ++k)
        std::copy(dA_acc.data() + k * dblk, dA_acc.data() + k * dblk + w, dA_b + k * d);
    }
  });
}

void check(const torch::Tensor& t, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(),
              name, " must be a contiguous CPU tensor of ", like.scalar_type());
}

// dt, x: [b, L, d]; A: [n, d]; B, C: [b, L, n] -> (y [b, L, d], states [b, chunks, n, d])
std::vector<torch::Tensor> forward(torch::Tensor dt, torch::Tensor x, torch::Tensor A,
                                   torch::Tensor B, torch::Tensor C, int64_t chunk,
                                   int64_t dblk) {
  for (auto [t, name] : {std::pair{x, "x"}, {A, "A"}, {B, "B"}, {C, "C"}, {dt, "dt"}})
    check(t, name, dt);
  const int64_t b = dt.size(0), L = dt.size(1), d = dt.size(2), n = A.size(0);
  auto y = torch::empty_like(dt);
  auto states = torch::empty({b, (L + chunk - 1) / chunk, n, d}, dt.options());
  AT_DISPATCH_FLOATING_TYPES(dt.scalar_type(), "selective_scan_forward", [&] {
    forward_kernel<scalar_t>(dt.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                             A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(),
                             C.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                             states.data_ptr<scalar_t>(), b, L, d, n, chunk, dblk);
  });
  return {y, states};
}

// -> (ddt, dx [b, L, d], dA [n, d], dB, dC [b, L, n])
std::vector<torch::Tensor> backward(torch::Tensor dt, torch::Tensor x, torch::Tensor A,
                                    torch::Tensor B, torch::Tensor C, torch::Tensor states,
                                    torch::Tensor dy, int64_t chunk, int64_t dblk) {
  for (auto [t, name] : {std::pair{x, "x"}, {A, "A"}, {B, "B"}, {C, "C"}, {states, "states"},
                         {dy, "dy"}})
    check(t, name, dt);
  const int64_t b = dt.size(0), L = dt.size(1), d = dt.size(2), n = A.size(0);
  const int64_t blocks = (d + dblk - 1) / dblk;
  auto ddt = torch::empty_like(dt), dx = torch::empty_like(dt);
  auto dA = torch::empty({b, n, d}, dt.options());
  auto dB = torch::empty({blocks, b, L, n}, dt.options());
  auto dC = torch::empty({blocks, b, L, n}, dt.options());
  AT_DISPATCH_FLOATING_TYPES(dt.scalar_type(), "selective_scan_backward", [&] {
    backward_kernel<scalar_t>(
        dt.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
        B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), states.data_ptr<scalar_t>(),
        dy.data_ptr<scalar_t>(), ddt.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
        dA.data_ptr<scalar_t>(), dB.data_ptr<scalar_t>(), dC.data_ptr<scalar_t>(), b, L, d, n,
        chunk, dblk);
  });
  return {ddt, dx, dA.sum(0), dB.sum(0), dC.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan recurrence, forward (CPU)");
  m.def("backward", &backward, "selective scan recurrence, backward (CPU)");
}
