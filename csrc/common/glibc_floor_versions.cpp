// References bound to the first version of each symbol that glibc_floor.cpp redefines (see
// there). A translation unit of its own: `.symver exp, exp@BASE` renames this file's references
// to exp, which must not be the file that defines our hidden exp. Compiled without LTO, so the
// renamed references stay in this object.
#if defined(__linux__)
#include <features.h>
#endif
#if defined(__GLIBC__) && (defined(__x86_64__) || defined(__aarch64__))
#include <pthread.h>

#if defined(__x86_64__)
#define RETAIN_GLIBC_BASE "GLIBC_2.2.5"
#else
#define RETAIN_GLIBC_BASE "GLIBC_2.17"
#endif
#define RETAIN_BIND_BASE(name) __asm__(".symver " #name "," #name "@" RETAIN_GLIBC_BASE)
#define RETAIN_HIDDEN __attribute__((visibility("hidden")))

extern "C" {

#if __GLIBC_PREREQ(2, 29)
double exp(double);
double log(double);
double pow(double, double);
RETAIN_BIND_BASE(exp);
RETAIN_BIND_BASE(log);
RETAIN_BIND_BASE(pow);
RETAIN_HIDDEN double retain_exp_base(double x) { return exp(x); }
RETAIN_HIDDEN double retain_log_base(double x) { return log(x); }
RETAIN_HIDDEN double retain_pow_base(double x, double y) { return pow(x, y); }
#endif

#if __GLIBC_PREREQ(2, 34)
RETAIN_BIND_BASE(pthread_once);
RETAIN_BIND_BASE(__pthread_key_create);
int __pthread_key_create(pthread_key_t*, void (*)(void*));
RETAIN_HIDDEN int retain_pthread_once_base(pthread_once_t* once, void (*init)(void)) {
  return pthread_once(once, init);
}
RETAIN_HIDDEN int retain_pthread_key_create_base(pthread_key_t* key, void (*destroy)(void*)) {
  return __pthread_key_create(key, destroy);
}
#endif

}  // extern "C"
#endif
