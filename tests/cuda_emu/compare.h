// Shared by the emulated-kernel harnesses: NaN-filled outputs and one comparison.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace emu_check {

inline int fails = 0, checks = 0;

template <class T>
double val(const T& x) {
  return static_cast<double>(retain::load_as<double>(x));
}

// n values of T, NaN where T can hold it: an element a kernel never writes fails the comparison.
template <class T>
std::vector<T> nans(size_t n) {
  std::vector<T> x(n);
  for (auto& e : x) retain::store_as(e, std::numeric_limits<double>::quiet_NaN());
  return x;
}

// n normal draws times `scale`, stored as T (rounded to 16 bits where T is).
template <class T>
std::vector<T> randn(std::mt19937& r, size_t n, double scale) {
  std::normal_distribution<double> nd(0, 1);
  std::vector<T> x(n);
  for (auto& e : x) retain::store_as(e, nd(r) * scale);
  return x;
}

// max |a - b| <= tol * max(1, max |a|); NaN and infinities must match in place (and sign).
template <class X, class Y>
void cmp(const std::string& what, const std::vector<X>& a, const std::vector<Y>& b, double tol) {
  ++checks;
  double m = 0, ref = 1;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = val(a[i]), y = val(b[i]);
    if (std::isnan(x) || std::isnan(y) || std::isinf(x) || std::isinf(y)) {
      if (!(std::isnan(x) && std::isnan(y)) && x != y) {
        ++fails;
        printf("FAIL %s [%zu]: cpu %g emu %g\n", what.c_str(), i, x, y);
        return;
      }
      continue;
    }
    m = std::max(m, std::fabs(x - y));
    ref = std::max(ref, std::fabs(x));
  }
  if (m > tol * ref) {
    ++fails;
    printf("FAIL %s: max diff %g (scale %g)\n", what.c_str(), m, ref);
  }
}

inline int report() {
  printf("checks %d fails %d\n", checks, fails);
  return fails != 0;
}

}  // namespace emu_check
