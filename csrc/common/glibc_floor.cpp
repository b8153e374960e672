// The module's glibc floor: whatever glibc the build machine has, the linked module asks for no
// symbol version newer than glibc 2.28 (the manylinux_2_28 floor), so a wheel built on a newer
// system runs on any glibc >= 2.28 (README "Release build"). Linked into _C on Linux
// (RETAIN_PORTABLE_LINK), with libstdc++ linked statically, which removes the GLIBCXX/CXXABI
// needs. What is left are the glibc symbols that gained a version after 2.28, referenced by our
// code or by libstdc++.a; each gets a hidden definition here, which the static link prefers to
// the shared one:
//
// - exp, log, pow (double; new versions in 2.29, which only dropped SVID matherr handling) and
//   pthread_once, __pthread_key_create (2.34: moved from libpthread into libc) forward to the
//   original versions (glibc_floor_versions.cpp), present in every glibc.
// - __libc_single_threaded (2.32), read by libstdc++'s inline atomics when the headers have
//   <sys/single_threaded.h>: our copy says "maybe threaded" (0), so libstdc++ always takes the
//   atomic path, correct in every process.
// - arc4random (2.36), reachable only through std::random_device (which the module never
//   constructs): the same 32 random bits from getentropy (2.25).
//
// tests/test_package.py checks the linked module's version needs.
#if defined(__linux__)
#include <features.h>  // __GLIBC__, __GLIBC_PREREQ (absent on musl)
#endif
#if defined(__GLIBC__) && (defined(__x86_64__) || defined(__aarch64__))
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

// Each definition takes the symbol's name through an asm label: a C++ declaration of `exp` or
// `pthread_once` already exists (the compiler's builtin, <pthread.h>) with default visibility.
#define RETAIN_DEFINE_HIDDEN(name) __asm__(#name) __attribute__((visibility("hidden")))

extern "C" {

#if __GLIBC_PREREQ(2, 29)
double retain_exp_base(double);
double retain_log_base(double);
double retain_pow_base(double, double);
double retain_exp(double) RETAIN_DEFINE_HIDDEN(exp);
double retain_log(double) RETAIN_DEFINE_HIDDEN(log);
double retain_pow(double, double) RETAIN_DEFINE_HIDDEN(pow);
double retain_exp(double x) { return retain_exp_base(x); }
double retain_log(double x) { return retain_log_base(x); }
double retain_pow(double x, double y) { return retain_pow_base(x, y); }
#endif

#if __GLIBC_PREREQ(2, 32)
char retain_single_threaded RETAIN_DEFINE_HIDDEN(__libc_single_threaded) = 0;
#endif

#if __GLIBC_PREREQ(2, 34)
int retain_pthread_once_base(pthread_once_t*, void (*)(void));
int retain_pthread_key_create_base(pthread_key_t*, void (*)(void*));
int retain_pthread_once(pthread_once_t*, void (*)(void)) RETAIN_DEFINE_HIDDEN(pthread_once);
int retain_pthread_key_create(pthread_key_t*, void (*)(void*)) RETAIN_DEFINE_HIDDEN(__pthread_key_create);
int retain_pthread_once(pthread_once_t* once, void (*init)(void)) { return retain_pthread_once_base(once, init); }
int retain_pthread_key_create(pthread_key_t* key, void (*destroy)(void*)) {
  return retain_pthread_key_create_base(key, destroy);
}
#endif

#if __GLIBC_PREREQ(2, 36)
uint32_t retain_arc4random(void) RETAIN_DEFINE_HIDDEN(arc4random);
uint32_t retain_arc4random(void) {
  uint32_t bits;
  if (getentropy(&bits, sizeof bits) != 0) __builtin_trap();  // arc4random cannot fail either
  return bits;
}
#endif

}  // extern "C"
#endif
