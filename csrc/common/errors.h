// Checks the native side makes of its own assumptions; Python validates user input first.
// std::invalid_argument surfaces in Python as ValueError.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <initializer_list>
#include <string>

namespace retain {

inline void check(bool ok, const std::string& op, const std::string& what) {
  if (!ok) throw std::invalid_argument(op + ": " + what);
}

template <typename T>
inline const T* as_ptr(std::uintptr_t p, const char* op, const char* arg, bool allow_null = false) {
  if (p == 0) {
    check(allow_null, op, std::string(arg) + " must not be a null pointer");
    return nullptr;
  }
  check(p % alignof(T) == 0, op, std::string(arg) + " is not aligned to " + std::to_string(alignof(T)) + " bytes");
  return reinterpret_cast<const T*>(p);
}

template <typename T>
inline T* as_mut_ptr(std::uintptr_t p, const char* op, const char* arg, bool allow_null = false) {
  return const_cast<T*>(as_ptr<T>(p, op, arg, allow_null));
}

inline void check_sizes(std::initializer_list<int64_t> sizes, const char* op) {
  for (int64_t s : sizes) check(s >= 0, op, "negative size " + std::to_string(s));
}

}  // namespace retain
