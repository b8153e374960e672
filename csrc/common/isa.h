// Function multi-versioning for the CPU kernels: a function marked RETAIN_ISA_CLONES is compiled
// for AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3) and the baseline, and the loader picks the best
// the CPU supports. Bodies force-inlined into such a function are compiled for each ISA, so one
// portable wheel runs wide vectors where the CPU has them.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RETAIN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RETAIN_ISA_CLONES
#endif
