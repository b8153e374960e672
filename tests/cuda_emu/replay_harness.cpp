// Checks the replay family's CUDA kernels (segment_tree_cuda.cu, rows_cuda.cu), run on the CPU
// under the fiber emulation of cuda_runtime.h, against the CPU kernels: sum and min tree updates
// (the whole tree, bit for bit, after each batch; repeated indices in a batch, the last of which
// must win; batches past the block size; the owner scratch back to all -1; the barriers counted),
// sampling from a sum tree with zero priorities (index and probability bit for bit, stratified and
// i.i.d.), and row gathers and scatters over fields of 1 ... 12288 bytes, 16-byte aligned or not.
// Outputs start as NaN / -7 / a fill the CPU side does not use, so an unwritten element fails.
// Built and run by tests/ops/replay/test_cuda_emulated.py.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "compare.h"
#include "replay/rows.h"
#include "replay/segment_tree.h"

using namespace retain;
using namespace retain::replay;

using emu_check::nans;

constexpr auto kCpu = CpuCapability::Default;
const std::vector<int64_t> kCapacities = {1, 2, 3, 5, 1000, 1025};

// Bit for bit: the CUDA kernels compute every value with the CPU kernels' operations.
template <class T>
void same(const std::string& what, const std::vector<T>& a, const std::vector<T>& b) {
  ++emu_check::checks;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) {
      ++emu_check::fails;
      printf("FAIL %s [%zu]: cpu %g emu %g\n", what.c_str(), i, static_cast<double>(a[i]), static_cast<double>(b[i]));
      return;
    }
  }
}

int64_t leaves_of(int64_t capacity) {
  int64_t p = 1;
  while (p < capacity) p *= 2;
  return p;
}

// Batch sizes: empty, one, a few (with repeats), more than the capacity (many repeats) and more
// than the update block's 1024 threads.
void update_case(TreeOp op, int64_t capacity, unsigned seed) {
  std::mt19937 r(seed);
  const int64_t leaves = leaves_of(capacity);
  const double identity = op == TreeOp::kSum ? 0.0 : std::numeric_limits<double>::infinity();
  std::vector<double> tc(2 * leaves, identity), te = tc;
  std::vector<int32_t> owner(capacity, -1);
  std::uniform_int_distribution<int64_t> pick(0, capacity - 1);
  std::uniform_real_distribution<double> prio(0, 10);
  const std::string name = std::string(op == TreeOp::kSum ? "sum" : "min") + " C" + std::to_string(capacity);
  int b = 0;
  for (int64_t k : {int64_t{0}, int64_t{1}, int64_t{6}, 2 * capacity + 3, int64_t{3000}, int64_t{17}}) {
    std::vector<int64_t> idx(k);
    std::vector<double> val(k);
    for (int64_t j = 0; j < k; ++j) {
      idx[j] = (j > 0 && j % 5 == 4) ? idx[j / 2] : pick(r);  // repeats inside the batch even when C is large
      val[j] = (r() % 7 == 0) ? 0.0 : prio(r);
    }
    tree_update_cpu<kCpu>(op, tc.data(), leaves, idx.data(), val.data(), k, 1);
    const long before = emu::barriers;
    tree_update_cuda(op, te.data(), leaves, idx.data(), val.data(), k, owner.data(), 0);
    const std::string tag = "update " + name + " batch " + std::to_string(b++) + " k" + std::to_string(k);
    same(tag + " tree", tc, te);
    same(tag + " owner", std::vector<int32_t>(capacity, -1), owner);
    // Fibers switch only at barriers, so a missing one changes no result here (each thread's segment
    // runs whole, and whole paths in any order give the right tree) but races on a GPU: every
    // thread must wait after the election, after the leaf writes and before each level.
    int64_t levels = 0;
    for (int64_t p = leaves; p > 1; p >>= 1) ++levels;
    same(tag + " barriers (cpu: expected)", std::vector<long>{k ? long(blockDim.x) * (2 + levels) : 0},
         std::vector<long>{emu::barriers - before});
  }
}

void sample_case(int64_t capacity, unsigned seed) {
  std::mt19937 r(seed);
  const int64_t leaves = leaves_of(capacity);
  std::vector<double> tree(2 * leaves, 0.0);
  std::vector<int64_t> all(capacity);
  std::iota(all.begin(), all.end(), 0);
  std::vector<double> prio(capacity);
  std::uniform_real_distribution<double> ud(0, 1);
  for (auto& p : prio) p = (r() % 3 == 0) ? 0.0 : ud(r) * 5;
  if (std::none_of(prio.begin(), prio.end(), [](double p) { return p > 0; })) prio[r() % capacity] = 1.5;
  tree_update_cpu<kCpu>(TreeOp::kSum, tree.data(), leaves, all.data(), prio.data(), capacity, 1);
  for (int64_t n : {1, 7, 300})
    for (bool stratified : {false, true}) {
      std::vector<double> u(n);
      for (auto& x : u) x = ud(r);
      if (n > 1) u[0] = 0.0, u[1] = std::nextafter(1.0, 0.0);  // the ends of [0, 1)
      std::vector<int64_t> ic(n, -7), ie(n, -7);
      auto pc = nans<double>(n), pe = nans<double>(n);
      tree_sample_cpu<kCpu>(tree.data(), leaves, u.data(), n, stratified, ic.data(), pc.data(), 1);
      tree_sample_cuda(tree.data(), leaves, u.data(), n, stratified, ie.data(), pe.data(), 0);
      const std::string tag = "sample C" + std::to_string(capacity) + " n" + std::to_string(n) +
                              (stratified ? " stratified" : " iid");
      same(tag + " idx", ic, ie);
      same(tag + " prob", pc, pe);
    }
}

// Fields of 1, 8, 12 (not a multiple of 16), 64 and 12288 bytes a row on 16-byte aligned buffers,
// and 32 bytes a row at an address 4 bytes past alignment (the byte path for a multiple of 16).
struct Rows {
  std::vector<int64_t> bytes = {1, 8, 12, 64, 12288, 32};
  std::vector<int64_t> offset = {0, 0, 0, 0, 0, 4};
  std::vector<std::vector<unsigned char>> storage, batch;
  std::vector<int64_t> table;
  Rows(int64_t capacity, int64_t k, std::mt19937& r, int fill) {
    for (size_t f = 0; f < bytes.size(); ++f) {
      storage.emplace_back(capacity * bytes[f] + 32);
      batch.emplace_back(k * bytes[f] + 32);
      for (auto& c : storage.back()) c = static_cast<unsigned char>(r());
      for (auto& c : batch.back()) c = fill < 0 ? static_cast<unsigned char>(r()) : static_cast<unsigned char>(fill);
    }
    for (size_t f = 0; f < bytes.size(); ++f) {
      table.push_back(static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(aligned(storage[f]) + offset[f])));
      table.push_back(static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(aligned(batch[f]) + offset[f])));
      table.push_back(bytes[f]);
    }
  }
  static unsigned char* aligned(std::vector<unsigned char>& v) {
    const auto a = reinterpret_cast<std::uintptr_t>(v.data());
    return v.data() + ((16 - a % 16) % 16);
  }
  int64_t fields() const { return static_cast<int64_t>(bytes.size()); }
};

void rows_case(bool scatter, unsigned seed) {
  constexpr int64_t kCap = 37, kK = 50;
  std::mt19937 r(seed);
  std::vector<int64_t> idx(kK);
  if (scatter) {  // distinct slots apart from -1: the CUDA kernel's contract
    std::vector<int64_t> slots(kCap);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), r);
    for (int64_t j = 0; j < kK; ++j) idx[j] = j < 30 ? slots[j] : -1;
    std::shuffle(idx.begin(), idx.end(), r);
  } else {
    for (auto& i : idx) i = r() % kCap;  // repeats: k > capacity
    idx[0] = 0, idx[1] = kCap - 1;
  }
  // The same contents on both sides; for gathers the batches start as different fills, so a byte
  // the CUDA kernel leaves unwritten differs.
  std::mt19937 rc(seed + 1000), re(seed + 1000);
  Rows cpu(kCap, kK, rc, scatter ? -1 : 0x00), emu(kCap, kK, re, scatter ? -1 : 0xff);
  const int64_t bad = rows_copy_cpu<kCpu>(cpu.table.data(), cpu.fields(), idx.data(), kK, kCap, scatter, 1);
  rows_copy_cuda(emu.table.data(), emu.fields(), idx.data(), kK, scatter, 0);
  ++emu_check::checks;
  if (bad != 0) {
    ++emu_check::fails;
    printf("FAIL rows %s: cpu kernel reports %lld bad indices\n", scatter ? "scatter" : "gather",
           static_cast<long long>(bad));
  }
  for (size_t f = 0; f < cpu.bytes.size(); ++f) {
    const std::string tag = std::string("rows ") + (scatter ? "scatter" : "gather") + " field " +
                            std::to_string(f) + " (" + std::to_string(cpu.bytes[f]) + " bytes)";
    const auto& a = scatter ? cpu.storage[f] : cpu.batch[f];
    const auto& b = scatter ? emu.storage[f] : emu.batch[f];
    // the bytes the kernel may touch (the padding around them is not compared)
    const int64_t base = static_cast<int64_t>(cpu.table[3 * f + (scatter ? 0 : 1)] -
                                              reinterpret_cast<std::uintptr_t>(a.data()));
    const int64_t base_e = static_cast<int64_t>(emu.table[3 * f + (scatter ? 0 : 1)] -
                                                reinterpret_cast<std::uintptr_t>(b.data()));
    const int64_t n = (scatter ? kCap : kK) * cpu.bytes[f];
    same(tag, std::vector<int>(a.begin() + base, a.begin() + base + n),
         std::vector<int>(b.begin() + base_e, b.begin() + base_e + n));
  }
}

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  unsigned seed = 1;
  for (int64_t capacity : kCapacities)
    for (TreeOp op : {TreeOp::kSum, TreeOp::kMin}) update_case(op, capacity, seed++);
  for (int64_t capacity : kCapacities) sample_case(capacity, seed++);
  for (bool scatter : {false, true}) rows_case(scatter, seed++);
  return emu_check::report();
}
