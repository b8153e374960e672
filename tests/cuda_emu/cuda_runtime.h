// Minimal CPU emulation of the CUDA features the kernels use (tests/ops/test_*_cuda_emulated.py):
// each block runs its threads as cooperative fibers (ucontext) on one OS thread; __syncthreads and
// warp shuffles are barriers. Blocks run one after another, so a kernel's static __shared__
// arrays may be plain statics. Dynamic shared memory is poisoned (0xff bytes: NaN) per block.
#pragma once
#include <ucontext.h>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <functional>
#include <utility>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__
#define __align__(n)
#define __restrict__ __restrict
struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 { unsigned x, y, z; dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {} };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
typedef int cudaError_t;
enum { cudaSuccess = 0 };
typedef void* cudaStream_t;
inline const char* cudaGetErrorString(int) { return "emu"; }
inline int cudaGetLastError() { return 0; }
inline int cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { memset(p, v, n); return 0; }
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline size_t emu_smem_optin = 0;
template <class F> int cudaFuncSetAttribute(F, cudaFuncAttribute, int b) { emu_smem_optin = b; return 0; }
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
inline int cudaGetDevice(int* d) { *d = 0; return 0; }
inline int emu_sms = 4;
inline int cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = emu_sms; return 0; }
alignas(16) inline unsigned char emu_smem[1 << 20];

namespace emu {
struct Fiber { ucontext_t ctx; std::vector<char> stack; bool done = false; };
struct Bar { int n = 0, count = 0; long gen = 0; };
inline std::vector<Fiber>* fibers;
inline ucontext_t sched;
inline int cur = 0;
inline Bar block_bar;
inline std::vector<Bar> warp_bars;
inline unsigned char slots[1024][8];
inline std::function<void()> body;
inline long barriers = 0;
inline void yield() { swapcontext(&(*fibers)[cur].ctx, &sched); }
inline void wait(Bar& b) {
  ++barriers;
  const long g = b.gen;
  if (++b.count == b.n) { b.count = 0; ++b.gen; return; }
  while (b.gen == g) yield();
}
inline void entry() { body(); (*fibers)[cur].done = true; }
template <class K, class... Args>
void launch(K k, dim3 grid, unsigned block, size_t smem, cudaStream_t, Args... args) {
  if (smem > 48 * 1024 && emu_smem_optin < smem) { fprintf(stderr, "EMU: smem %zu without opt-in\n", smem); abort(); }
  if (block > 1024 || block % 32) { fprintf(stderr, "EMU: bad block %u\n", block); abort(); }
  std::vector<Fiber> fs(block);
  fibers = &fs;
  for (unsigned b = 0; b < grid.x * grid.y * grid.z; ++b) {
    memset(emu_smem, 0xff, smem + 64);
    block_bar = Bar{int(block), 0, 0};
    warp_bars.assign(block / 32, Bar{32, 0, 0});
    body = [&] { k(args...); };
    for (unsigned t = 0; t < block; ++t) {
      fs[t].done = false;
      fs[t].stack.assign(256 * 1024, 0);
      getcontext(&fs[t].ctx);
      fs[t].ctx.uc_stack.ss_sp = fs[t].stack.data();
      fs[t].ctx.uc_stack.ss_size = fs[t].stack.size();
      fs[t].ctx.uc_link = &sched;
      makecontext(&fs[t].ctx, entry, 0);
    }
    blockIdx = {b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y)};
    blockDim.x = block; gridDim = {grid.x, grid.y, grid.z};
    std::vector<unsigned> order(block);
    for (unsigned t = 0; t < block; ++t) order[t] = t;
    static unsigned rs = 12345;
    const bool rnd = getenv("EMU_RANDOM") != nullptr;
    for (;;) {
      bool any = false;
      if (rnd) for (unsigned t = block - 1; t > 0; --t) { rs = rs * 1103515245u + 12345u; std::swap(order[t], order[(rs >> 8) % (t + 1)]); }
      for (unsigned t0 = 0; t0 < block; ++t0) {
        const unsigned t = order[t0];
        if (fs[t].done) continue;
        any = true;
        cur = t; threadIdx.x = t;
        swapcontext(&sched, &fs[t].ctx);
      }
      if (!any) break;
    }
  }
}
}  // namespace emu
inline void __syncthreads() { emu::wait(emu::block_bar); }
// Fibers share one OS thread and switch only at barriers: a plain read-modify-write is atomic.
inline int atomicMax(int* p, int v) { const int old = *p; if (v > old) *p = v; return old; }
template <class T> T __shfl_xor_sync(unsigned mask, T x, int o) {
  if (mask != 0xffffffffu) abort();
  const int tid = threadIdx.x, w = tid / 32, l = tid % 32;
  memcpy(emu::slots[tid], &x, sizeof(T));
  emu::wait(emu::warp_bars[w]);
  T y; memcpy(&y, emu::slots[w * 32 + (l ^ o)], sizeof(T));
  emu::wait(emu::warp_bars[w]);
  return y;
}
template <class T> T __shfl_down_sync(unsigned mask, T x, unsigned o) {
  if (mask != 0xffffffffu) abort();
  const int tid = threadIdx.x, w = tid / 32, l = tid % 32;
  memcpy(emu::slots[tid], &x, sizeof(T));
  emu::wait(emu::warp_bars[w]);
  T y = x;
  if (l + static_cast<int>(o) < 32) memcpy(&y, emu::slots[tid + o], sizeof(T));
  emu::wait(emu::warp_bars[w]);
  return y;
}
