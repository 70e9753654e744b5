// Hand-written CPU kernels of the fused optimizer paths (see _native.py for how this file is
// compiled, cached and called). Plain C ABI, no torch headers: the caller passes raw pointers
// of contiguous tensors and the sizes of each as (outer, n, inner), the sphere axis being the
// middle one (a "slice" of n elements, stride `inner`).
//
// Why by hand: every step of Riemannian Adam needs several per-slice reductions that depend on
// one another (projection, second moment, retraction norm, transport). A compiler of tensor
// programs emits one loop nest per reduction, each re-reading the tensors from memory; here
// each slice is read once from memory, the dependent reductions re-read it from L1, and the
// results are written once: the same memory traffic as torch's fused Adam.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using i64 = int64_t;

// One tensor's slices: element (o, i, j) of an (outer, n, inner) tensor is at o*n*inner +
// i*inner + j; slice k = o*inner + j starts at o*n*inner + j and has stride inner.
struct Layout {
  i64 outer, n, inner;
  i64 slices() const { return outer * inner; }
  i64 start(i64 k) const { return (k / inner) * n * inner + (k % inner); }
};

// Slice k of the whole call: which tensor (binary search of the prefix sums) and which slice.
struct Slices {
  std::vector<i64> first;  // first[t] = number of slices before tensor t
  explicit Slices(const Layout* lay, i64 count) : first(count + 1, 0) {
    for (i64 t = 0; t < count; ++t) first[t + 1] = first[t] + lay[t].slices();
  }
  i64 total() const { return first.back(); }
  i64 tensor_of(i64 k) const {
    return std::upper_bound(first.begin(), first.end(), k) - first.begin() - 1;
  }
};

template <typename T, bool C>
inline i64 at(i64 i, i64 s) {
  return C ? i : i * s;
}

// <a, b> along a slice. Four independent partial sums: a single one would make the loop wait
// on the adder's latency (the slice is in L1, so that latency, not memory, would bound it).
template <typename A, typename T, bool C>
A dot(const T* a, const T* b, i64 n, i64 s) {
  const i64 q = n / 4;
  A a0 = 0, a1 = 0, a2 = 0, a3 = 0, tail = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (i64 i = 0; i < q; ++i) {
    a0 += A(a[at<T, C>(i, s)]) * A(b[at<T, C>(i, s)]);
    a1 += A(a[at<T, C>(i + q, s)]) * A(b[at<T, C>(i + q, s)]);
    a2 += A(a[at<T, C>(i + 2 * q, s)]) * A(b[at<T, C>(i + 2 * q, s)]);
    a3 += A(a[at<T, C>(i + 3 * q, s)]) * A(b[at<T, C>(i + 3 * q, s)]);
  }
  for (i64 i = 4 * q; i < n; ++i) tail += A(a[at<T, C>(i, s)]) * A(b[at<T, C>(i, s)]);
  return (a0 + a1) + (a2 + a3) + tail;
}

// sin(t)/t with the same series below the same threshold as spheretorch.sphere.sinc
template <typename T>
T sinc(T t) {
  const T thr = sizeof(T) == 8 ? T(1e-2) : T(0.25);
  if (std::fabs(t) < thr) {
    T t2 = t * t;
    return 1 - t2 / 6 * (1 - t2 / 20 * (1 - t2 / 42));
  }
  return std::sin(t) / t;
}

// torch.lerp's formula for a scalar weight w: a + w (b - a) for w < 1/2, else b - (b - a)(1 - w)
template <typename T>
inline T lerp(T a, T b, T w) {
  return w < T(0.5) ? a + w * (b - a) : b - (b - a) * (T(1) - w);
}

struct AdamHyper {
  double lr, beta1, beta2, eps;
  int maximize, row, exp, amsgrad;
};

// x <- R_x(u) for the tangent step u (contiguous scratch), the tangent vector t (null: none)
// moved to the new point: the projective retraction (x + u) / |x + u| and projection onto the
// new tangent space, or (exp) exp_x(u) = cos|u| x + sinc|u| u, re-normalised, and parallel
// transport along the geodesic of u (the formulas of spheretorch.sphere.foreach.expmap_).
template <typename T, bool C>
void retract_slice(T* x, T* t, const T* u, i64 n, i64 s, bool exp) {
  T yy = 0;
  if (exp) {
    T uu = 0, ut = 0;
#pragma omp simd reduction(+ : uu, ut)
    for (i64 i = 0; i < n; ++i) {
      uu += u[i] * u[i];
      if (t) ut += u[i] * t[at<T, C>(i, s)];
    }
    const T nu = std::sqrt(uu), cos_n = std::cos(nu), sinc_n = sinc(nu), half = sinc(nu / 2);
    const T cu = T(0.5) * (half * half * ut), cx = ut * sinc_n;
#pragma omp simd reduction(+ : yy)
    for (i64 i = 0; i < n; ++i) {
      const i64 k = at<T, C>(i, s);
      if (t) t[k] = t[k] - cu * u[i] - cx * x[k];
      const T y = cos_n * x[k] + sinc_n * u[i];
      x[k] = y;
      yy += y * y;
    }
    const T inv = 1 / std::sqrt(yy);
#pragma omp simd
    for (i64 i = 0; i < n; ++i) x[at<T, C>(i, s)] *= inv;
    return;
  }
#pragma omp simd reduction(+ : yy)
  for (i64 i = 0; i < n; ++i) {
    const i64 k = at<T, C>(i, s);
    const T y = x[k] + u[i];
    x[k] = y;
    yy += y * y;
  }
  const T inv = 1 / std::sqrt(yy);
  T yt = 0;
#pragma omp simd reduction(+ : yt)
  for (i64 i = 0; i < n; ++i) {
    const i64 k = at<T, C>(i, s);
    const T y = x[k] * inv;
    x[k] = y;
    if (t) yt += y * t[k];
  }
  if (!t) return;
#pragma omp simd
  for (i64 i = 0; i < n; ++i) {
    const i64 k = at<T, C>(i, s);
    t[k] -= yt * x[k];
  }
}

// Riemannian Adam with one second moment per slice (the default): three passes over the
// slice. The second gathers every sum the retraction needs (|r|^2, <x,m>, |m|^2, |x|^2), so
// that the new point and the transported momentum are written by the third pass alone:
// with u = c m, |x + u|^2 = |x|^2 + 2c<x,m> + c^2|m|^2 and <y, m> = (<x,m> + c|m|^2) / |x + u|;
// the exponential map uses |u| = |c||m| and <u, m> = c|m|^2 the same way.
template <typename T, bool C>
void adam_slice_row(T* x, const T* g, T* m, T* v, T* vmax, i64 n, i64 s, const AdamHyper& h,
                    T neg_step, T bc2_sqrt, T xg) {
  const T sgn = h.maximize ? T(-1) : T(1);
  const T w1 = T(1 - h.beta1), b2 = T(h.beta2), w2 = T(1 - h.beta2), eps = T(h.eps);
  T rr = 0, xm = 0, mm = 0, xx = 0;
#pragma omp simd reduction(+ : rr, xm, mm, xx)
  for (i64 i = 0; i < n; ++i) {
    const i64 k = at<T, C>(i, s);
    const T xk = x[k], r = sgn * g[k] - xg * xk, mk = lerp(m[k], r, w1);
    m[k] = mk;
    rr += r * r;
    xm += xk * mk;
    mm += mk * mk;
    xx += xk * xk;
  }
  T vk = v[0] * b2 + rr * w2;
  v[0] = vk;
  if (h.amsgrad) vk = vmax[0] = std::max(vmax[0], vk);
  const T c = neg_step / (std::sqrt(vk) / bc2_sqrt + eps);  // u = c m
  if (!h.exp) {
    const T inv = 1 / std::sqrt(xx + c * (2 * xm + c * mm));
    const T ym = (xm + c * mm) * inv;
#pragma omp simd
    for (i64 i = 0; i < n; ++i) {
      const i64 k = at<T, C>(i, s);
      const T y = (x[k] + c * m[k]) * inv;
      x[k] = y;
      m[k] -= ym * y;
    }
    return;
  }
  // exp_x(u) = cos|u| x + sinc|u| u, re-normalised; m transported along the geodesic
  const T nu = std::fabs(c) * std::sqrt(mm), cos_n = std::cos(nu), sinc_n = sinc(nu);
  const T half = sinc(nu / 2), um = c * mm;
  const T cm = 1 - T(0.5) * (half * half * um) * c, cx = um * sinc_n, su = sinc_n * c;
  const T inv = 1 / std::sqrt(cos_n * cos_n * xx + su * (2 * cos_n * xm + su * mm));
#pragma omp simd
  for (i64 i = 0; i < n; ++i) {
    const i64 k = at<T, C>(i, s);
    const T xk = x[k], mk = m[k];
    x[k] = (cos_n * xk + su * mk) * inv;
    m[k] = cm * mk - cx * xk;
  }
}

// One Riemannian Adam step of one slice (formulas of riemannian_adam._sphere_adam_bucket).
// x, g, m: the slice (stride s); v, vmax: its second moment (one number per slice when
// h.row, else the slice); u: scratch of n elements.
template <typename T, bool C>
void adam_slice(T* x, const T* g, T* m, T* v, T* vmax, i64 n, i64 s, const AdamHyper& h,
                T neg_step, T bc2_sqrt, T* u) {
  const T sgn = h.maximize ? T(-1) : T(1);
  const T w1 = T(1 - h.beta1), b2 = T(h.beta2), w2 = T(1 - h.beta2), eps = T(h.eps);
  // Riemannian gradient r = g - <x, g> x, momentum, second moment
  const T xg = sgn * dot<T, T, C>(x, g, n, s);
  if (h.row) {
    adam_slice_row<T, C>(x, g, m, v, vmax, n, s, h, neg_step, bc2_sqrt, xg);
    return;
  }
#pragma omp simd
  for (i64 i = 0; i < n; ++i) {
    const i64 k = at<T, C>(i, s);
    const T r = sgn * g[k] - xg * x[k];
    m[k] = lerp(m[k], r, w1);
    const T vk = v[k] * b2 + r * r * w2;
    v[k] = vk;
    if (h.amsgrad) vmax[k] = std::max(vmax[k], vk);
  }
  // the step u (tangent at x): m / denom is not tangent, project it
  {
    const T* vv = h.amsgrad ? vmax : v;
    T xu = 0;
#pragma omp simd reduction(+ : xu)
    for (i64 i = 0; i < n; ++i) {
      const i64 k = at<T, C>(i, s);
      const T ui = m[k] / (std::sqrt(vv[k]) / bc2_sqrt + eps) * neg_step;
      u[i] = ui;
      xu += x[k] * ui;
    }
#pragma omp simd
    for (i64 i = 0; i < n; ++i) u[i] -= xu * x[at<T, C>(i, s)];
  }
  retract_slice<T, C>(x, m, u, n, s, h.exp);
}

struct SgdHyper {
  double lr, momentum, dampening;
  int nesterov, maximize, exp, first;
};

// One Riemannian SGD step of one slice (formulas of riemannian_sgd's multi-tensor path);
// b: the momentum buffer slice or null.
template <typename T, bool C>
void sgd_slice(T* x, const T* g, T* b, i64 n, i64 s, const SgdHyper& h, T* u) {
  const T sgn = h.maximize ? T(-1) : T(1), mu = T(h.momentum), damp = T(1 - h.dampening);
  const T neg_lr = T(-h.lr);
  const T xg = sgn * dot<T, T, C>(x, g, n, s);
#pragma omp simd
  for (i64 i = 0; i < n; ++i) {
    const i64 k = at<T, C>(i, s);
    const T r = sgn * g[k] - xg * x[k];
    T d = r;
    if (b) {
      const T bk = h.first ? r : b[k] * mu + r * damp;
      b[k] = bk;
      d = h.nesterov ? r + mu * bk : bk;
    }
    u[i] = neg_lr * d;
  }
  retract_slice<T, C>(x, b, u, n, s, h.exp);
}

// x / |x|, as x times 1/|x| with that reciprocal computed from a float64 sum of squares and
// rounded once to T: within an ulp of the exactly rounded x / |x| (and a multiply, where a
// division would cost as much as the rest of the pass).
template <typename T, bool C>
void renorm_slice(T* x, i64 n, i64 s) {
  const T inv = T(1 / std::sqrt(dot<double, T, C>(x, x, n, s)));
#pragma omp simd
  for (i64 i = 0; i < n; ++i) x[at<T, C>(i, s)] *= inv;
}

// Slices are handed out in chunks of about this many elements (contiguous in memory for the
// usual last-axis layout): small enough to balance, large enough to amortise the scheduling.
constexpr i64 kChunkElems = 1 << 15;

template <typename F>
void for_each_slice(const Layout* lay, i64 count, int threads, i64 scratch, F&& f) {
  Slices sl(lay, count);
  i64 max_n = 1;
  for (i64 t = 0; t < count; ++t) max_n = std::max(max_n, lay[t].n);
  const i64 chunk = std::max<i64>(1, kChunkElems / max_n);
  const i64 total = sl.total();
#pragma omp parallel num_threads(threads) if (threads > 1 && total > chunk)
  {
    std::vector<char> buf(scratch * max_n + 64);
#pragma omp for schedule(dynamic, 1)
    for (i64 c = 0; c < (total + chunk - 1) / chunk; ++c) {
      const i64 end = std::min(total, (c + 1) * chunk);
      for (i64 k = c * chunk; k < end; ++k) {
        const i64 t = sl.tensor_of(k);
        f(t, k - sl.first[t], buf.data());
      }
    }
  }
}

template <typename T>
void adam_impl(i64 count, void** xs, void** gs, void** ms, void** vs, void** vmaxs,
               float** steps, const i64* shape, const AdamHyper& h, int threads) {
  std::vector<Layout> lay(count);
  std::vector<T> neg_step(count), bc2_sqrt(count);
  for (i64 t = 0; t < count; ++t) {
    lay[t] = Layout{shape[3 * t], shape[3 * t + 1], shape[3 * t + 2]};
    // the host-side float64 scalars of the foreach path, for this tensor's step count
    const double step = double(*steps[t]) + 1;
    neg_step[t] = T(-h.lr / (1 - std::pow(h.beta1, step)));
    bc2_sqrt[t] = T(std::sqrt(1 - std::pow(h.beta2, step)));
  }
  for_each_slice(lay.data(), count, threads, sizeof(T), [&](i64 t, i64 k, char* buf) {
    const Layout& L = lay[t];
    const i64 off = L.start(k), voff = h.row ? k : off;
    T* x = static_cast<T*>(xs[t]) + off;
    const T* g = static_cast<const T*>(gs[t]) + off;
    T* m = static_cast<T*>(ms[t]) + off;
    T* v = static_cast<T*>(vs[t]) + voff;
    T* vmax = h.amsgrad ? static_cast<T*>(vmaxs[t]) + voff : nullptr;
    T* u = reinterpret_cast<T*>(buf);
    if (L.inner == 1)
      adam_slice<T, true>(x, g, m, v, vmax, L.n, 1, h, neg_step[t], bc2_sqrt[t], u);
    else
      adam_slice<T, false>(x, g, m, v, vmax, L.n, L.inner, h, neg_step[t], bc2_sqrt[t], u);
  });
  for (i64 t = 0; t < count; ++t) *steps[t] += 1;
}

template <typename T>
void sgd_impl(i64 count, void** xs, void** gs, void** bufs, const i64* shape, const SgdHyper& h,
              int threads) {
  std::vector<Layout> lay(count);
  for (i64 t = 0; t < count; ++t) lay[t] = Layout{shape[3 * t], shape[3 * t + 1], shape[3 * t + 2]};
  for_each_slice(lay.data(), count, threads, sizeof(T), [&](i64 t, i64 k, char* buf) {
    const Layout& L = lay[t];
    const i64 off = L.start(k);
    T* x = static_cast<T*>(xs[t]) + off;
    const T* g = static_cast<const T*>(gs[t]) + off;
    T* b = bufs ? static_cast<T*>(bufs[t]) + off : nullptr;
    T* u = reinterpret_cast<T*>(buf);
    if (L.inner == 1)
      sgd_slice<T, true>(x, g, b, L.n, 1, h, u);
    else
      sgd_slice<T, false>(x, g, b, L.n, L.inner, h, u);
  });
}

// Each tensor's slices are split between the threads in equal consecutive parts, as
// at::parallel_for splits an elementwise kernel (torch's fused Adam) run just before: each
// thread then renormalises the rows it has just written, still in its own cache.
template <typename T>
void renorm_impl(i64 count, void** xs, const i64* shape, int threads) {
  i64 total = 0;
  for (i64 t = 0; t < count; ++t) total += shape[3 * t] * shape[3 * t + 1] * shape[3 * t + 2];
#pragma omp parallel num_threads(threads) if (threads > 1 && total > kChunkElems)
  for (i64 t = 0; t < count; ++t) {
    const Layout L{shape[3 * t], shape[3 * t + 1], shape[3 * t + 2]};
#pragma omp for schedule(static) nowait
    for (i64 k = 0; k < L.slices(); ++k) {
      T* x = static_cast<T*>(xs[t]) + L.start(k);
      if (L.inner == 1)
        renorm_slice<T, true>(x, L.n, 1);
      else
        renorm_slice<T, false>(x, L.n, L.inner);
    }
  }
}

// True when some element's exponent bits are all ones (an infinity or a NaN). Integer
// arithmetic only: vectorises without reassociating floating-point sums.
template <typename U>
bool any_nonfinite(const void* p, i64 begin, i64 end, U mask) {
  const U* a = static_cast<const U*>(p);
  U hit = 0;
#pragma omp simd reduction(| : hit)
  for (i64 i = begin; i < end; ++i) hit |= U((a[i] & mask) == mask);
  return hit != 0;
}

}  // namespace

extern "C" {

// Bumped when a signature changes: the loader refuses a cached library of another version.
int st_abi_version() { return 4; }

// dtype codes (as _native.py): 0 float32, 1 float64, 2 float16, 3 bfloat16.

// RiemannianAdam on `count` contiguous sphere tensors (x, g, m of shape[3t..3t+2], v/vmax the
// slices' second moments or full tensors), skipped entirely when *found_inf != 0. Step
// counters (float32, one per tensor) are read and incremented.
void st_riemannian_adam(int dtype, i64 count, void** xs, void** gs, void** ms, void** vs,
                        void** vmaxs, float** steps, const i64* shape, double lr, double beta1,
                        double beta2, double eps, int maximize, int row, int exp, int amsgrad,
                        const float* found_inf, int threads) {
  if (found_inf && *found_inf != 0) return;
  const AdamHyper h{lr, beta1, beta2, eps, maximize, row, exp, amsgrad};
  if (dtype == 0)
    adam_impl<float>(count, xs, gs, ms, vs, vmaxs, steps, shape, h, threads);
  else
    adam_impl<double>(count, xs, gs, ms, vs, vmaxs, steps, shape, h, threads);
}

// RiemannianSGD (bufs null: no momentum), skipped when *found_inf != 0.
void st_riemannian_sgd(int dtype, i64 count, void** xs, void** gs, void** bufs,
                       const i64* shape, double lr, double momentum, double dampening,
                       int nesterov, int maximize, int exp, int first, const float* found_inf,
                       int threads) {
  if (found_inf && *found_inf != 0) return;
  const SgdHyper h{lr, momentum, dampening, nesterov, maximize, exp, first};
  if (dtype == 0)
    sgd_impl<float>(count, xs, gs, bufs, shape, h, threads);
  else
    sgd_impl<double>(count, xs, gs, bufs, shape, h, threads);
}

// In place x / |x| along each tensor's middle axis, skipped when *keep != 0.
void st_renormalize(int dtype, i64 count, void** xs, const i64* shape, const float* keep,
                    int threads) {
  if (keep && *keep != 0) return;
  if (dtype == 0)
    renorm_impl<float>(count, xs, shape, threads);
  else
    renorm_impl<double>(count, xs, shape, threads);
}

// 1 when some element of the `count` contiguous tensors is an infinity or a NaN.
int st_nonfinite(i64 count, void** ptrs, const i64* numels, const int* dtypes, int threads) {
  constexpr i64 kBlock = 1 << 16;
  std::vector<i64> first(count + 1, 0);
  for (i64 t = 0; t < count; ++t) first[t + 1] = first[t] + (numels[t] + kBlock - 1) / kBlock;
  int found = 0;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads) if (threads > 1) \
    reduction(| : found)
  for (i64 c = 0; c < first[count]; ++c) {
    const i64 t = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    const i64 begin = (c - first[t]) * kBlock, end = std::min(numels[t], begin + kBlock);
    bool hit;
    switch (dtypes[t]) {
      case 0: hit = any_nonfinite<uint32_t>(ptrs[t], begin, end, 0x7f800000u); break;
      case 1: hit = any_nonfinite<uint64_t>(ptrs[t], begin, end, 0x7ff0000000000000ull); break;
      case 2: hit = any_nonfinite<uint16_t>(ptrs[t], begin, end, uint16_t(0x7c00)); break;
      default: hit = any_nonfinite<uint16_t>(ptrs[t], begin, end, uint16_t(0x7f80)); break;
    }
    found |= int(hit);
  }
  return found;
}

}  // extern "C"
