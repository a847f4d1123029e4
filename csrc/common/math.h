// Elementary functions shared by the CPU and CUDA kernels.
//
// On the device these are the CUDA math library's. On the host, float versions are branch-free
// Cephes-style polynomials (about 1 ulp on normal inputs) so that loops over them vectorise
// (libm calls do not); double versions are libm's and serve gradcheck.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FC_HD __host__ __device__ __forceinline__
#else
#define FC_HD inline __attribute__((always_inline))
#endif

namespace fastcascade {

#if defined(__CUDA_ARCH__)
FC_HD float fc_exp(float x) { return expf(x); }
FC_HD float fc_log(float x) { return logf(x); }
FC_HD float fc_log1p(float x) { return log1pf(x); }
#else
FC_HD float fc_bits_to_float(int32_t i) { float f; std::memcpy(&f, &i, 4); return f; }
FC_HD int32_t fc_float_to_bits(float f) { int32_t i; std::memcpy(&i, &f, 4); return i; }

// exp(x): x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n from the exponent bits.
FC_HD float fc_exp(float x) {
  const float lo = -87.33654f, hi = 88.72283f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  float res = y * fc_bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  res = x < lo ? 0.f : res;                        // underflow (and -inf) -> 0
  res = x > hi ? __builtin_huge_valf() : res;      // overflow (and +inf) -> inf
  return x != x ? x : res;                         // NaN stays NaN
}

// log(x) for x >= 0 (denormals included): x = 2^e m, m in [sqrt(.5), sqrt(2)), log(m) by polynomial.
FC_HD float fc_log(float x) {
  const bool denorm = x < 1.17549435e-38f;
  float xs = denorm ? x * 8388608.f : x;  // 2^23
  int32_t bits = fc_float_to_bits(xs);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126) - (denorm ? 23.f : 0.f);
  float m = fc_bits_to_float((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.f : e;
  m = small ? m + m - 1.f : m - 1.f;
  float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  float res = m + y + 0.693359375f * e;
  res = x == 0.f ? -__builtin_huge_valf() : res;
  res = x == __builtin_huge_valf() ? x : res;
  return (x < 0.f || x != x) ? __builtin_nanf("") : res;
}

// log1p through the rounding-error-cancelling identity (Goldberg).
FC_HD float fc_log1p(float x) {
  float u = 1.f + x;
  float d = u - 1.f;
  float res = fc_log(u) * (x / (d == 0.f ? 1.f : d));
  res = d == 0.f ? x : res;
  return u == __builtin_huge_valf() ? u : res;
}
#endif

FC_HD float fc_erf(float x) {
#if defined(__CUDA_ARCH__)
  return erff(x);
#else
  return std::erf(x);
#endif
}
FC_HD double fc_erf(double x) { return ::erf(x); }
FC_HD double fc_exp(double x) { return ::exp(x); }
FC_HD double fc_log(double x) { return ::log(x); }
FC_HD double fc_log1p(double x) { return ::log1p(x); }

// m^g for m >= 0, g >= 0, with 0^0 = 1 and 0^g = 0.
template <typename T>
FC_HD T fc_pow(T m, T g) {
  T res = fc_exp(g * fc_log(m));
  res = m == T(0) ? (g == T(0) ? T(1) : T(0)) : res;
  return g == T(0) ? T(1) : res;
}

// c * v with 0 * anything = 0, so a zero coefficient never meets an infinite term as NaN.
template <typename T>
FC_HD T fc_xmul(T c, T v) { return c == T(0) ? T(0) : c * v; }

template <typename T> FC_HD T fc_max(T a, T b) { return a > b ? a : b; }

}  // namespace fastcascade
