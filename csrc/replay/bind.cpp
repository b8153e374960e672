// The replay family's entries in retain._C: slot choice (CPU; the decisions are sequential), the
// sum/min trees and the row copies (CPU and CUDA). Thin: pointer and size checks, the launcher call.
#include <cstdint>
#include <string>

#include "common/bind.h"
#include "replay/rows.h"
#include "replay/segment_tree.h"
#include "replay/slots.h"

namespace retain {
namespace {

constexpr const char* kReservoir = "retain::reservoir_slots";
constexpr const char* kBalanced = "retain::class_balanced_slots";
constexpr const char* kTree = "retain::segment_tree";
constexpr const char* kRows = "retain::rows_copy";

replay::TreeOp tree_op(int op) {
  check(op == 0 || op == 1, kTree, "op must be 0 (sum) or 1 (min)");
  return static_cast<replay::TreeOp>(op);
}

void check_leaves(int64_t leaves) {
  check(leaves >= 1 && (leaves & (leaves - 1)) == 0, kTree, "leaves must be a power of two");
}

}  // namespace

void bind_replay(py::module_& m, bind::KernelTable& kernels) {
  bind::def<Cpu>(m, kernels, kReservoir, "reservoir_slots",
      [](auto dev, int64_t n_seen, int64_t batch, int64_t capacity, uint64_t seed, uintptr_t slots) {
        check_sizes({n_seen, batch}, kReservoir);
        check(capacity >= 1, kReservoir, "capacity must be >= 1");
        RETAIN_CPU(replay::reservoir_slots_cpu)(n_seen, batch, capacity, seed,
                                                as_mut_ptr<int64_t>(slots, kReservoir, "slots", batch == 0),
                                                dev.threads);
      });
  bind::def<Cpu>(m, kernels, kBalanced, "class_balanced_slots",
      [](auto dev, uintptr_t labels, int64_t batch, int64_t classes, int64_t capacity, uintptr_t slot_labels,
         uintptr_t counts, uintptr_t seen, uintptr_t full, uintptr_t size, uint64_t seed, uintptr_t slots) {
        const char* op = kBalanced;
        check_sizes({batch, classes}, op);
        check(capacity >= 1 && classes >= 1, op, "capacity and classes must be >= 1");
        RETAIN_CPU(replay::class_balanced_slots_cpu)(
            as_ptr<int64_t>(labels, op, "labels", batch == 0), batch, classes, capacity,
            as_mut_ptr<int64_t>(slot_labels, op, "slot_labels"), as_mut_ptr<int64_t>(counts, op, "counts"),
            as_mut_ptr<int64_t>(seen, op, "seen"), as_mut_ptr<uint8_t>(full, op, "full"),
            as_mut_ptr<int64_t>(size, op, "size"), seed, as_mut_ptr<int64_t>(slots, op, "slots", batch == 0),
            dev.threads);
      });
  bind::def<Cpu>(m, kernels, kTree, "tree_update",
      [](auto dev, int op, uintptr_t tree, int64_t leaves, uintptr_t idx, uintptr_t values, int64_t k) {
        check_leaves(leaves);
        check_sizes({k}, kTree);
        RETAIN_CPU(replay::tree_update_cpu)(tree_op(op), as_mut_ptr<double>(tree, kTree, "tree"), leaves,
                                                as_ptr<int64_t>(idx, kTree, "idx", k == 0),
                                            as_ptr<double>(values, kTree, "values", k == 0), k, dev.threads);
      });
#ifdef RETAIN_WITH_CUDA
  bind::def<Cuda>(m, kernels, kTree, "tree_update",
      [](auto dev, int op, uintptr_t tree, int64_t leaves, uintptr_t idx, uintptr_t values, int64_t k,
         uintptr_t owner) {
        check_leaves(leaves);
        check_sizes({k}, kTree);
        check(k < (int64_t{1} << 31), kTree, "at most 2^31 - 1 updates per call");
        replay::tree_update_cuda(tree_op(op), as_mut_ptr<double>(tree, kTree, "tree"), leaves,
                                 as_ptr<int64_t>(idx, kTree, "idx", k == 0), as_ptr<double>(values, kTree, "values", k == 0),
                                 k, as_mut_ptr<int32_t>(owner, kTree, "owner"), dev.stream);
      });
#endif
  bind::def<Cpu, Cuda>(m, kernels, kTree, "tree_sample",
      [](auto dev, uintptr_t tree, int64_t leaves, uintptr_t u, int64_t n, bool stratified, uintptr_t idx,
         uintptr_t prob) {
        check_leaves(leaves);
        check_sizes({n}, kTree);
        RETAIN_LAUNCH(dev, replay::tree_sample)(as_ptr<double>(tree, kTree, "tree"), leaves,
                                                as_ptr<double>(u, kTree, "u", n == 0), n, stratified,
                                                as_mut_ptr<int64_t>(idx, kTree, "idx", n == 0),
                                                as_mut_ptr<double>(prob, kTree, "prob", n == 0));
      });
  bind::def<Cpu>(m, kernels, kRows, "rows_copy",
      [](auto dev, uintptr_t table, int64_t fields, uintptr_t idx, int64_t k, int64_t capacity, bool scatter) {
        check_sizes({fields, k, capacity}, kRows);
        const auto* t = as_ptr<int64_t>(table, kRows, "table", fields == 0);
        const auto* i = as_ptr<int64_t>(idx, kRows, "idx", k == 0);
        // the number of out-of-range indices: Python raises an IndexError naming the op
        const int64_t bad = cpu_dispatch([&](auto cap) {
          return replay::rows_copy_cpu<decltype(cap)::value>(t, fields, i, k, capacity, scatter, dev.threads);
        });
        return bad;
      });
#ifdef RETAIN_WITH_CUDA
  bind::def<Cuda>(m, kernels, kRows, "rows_copy",
      [](auto dev, uintptr_t table, int64_t fields, uintptr_t idx, int64_t k, bool scatter) {
        check_sizes({fields, k}, kRows);
        check(k < (int64_t{1} << 31) && fields < 65536, kRows, "at most 2^31 - 1 rows and 65535 fields per call");
        replay::rows_copy_cuda(as_ptr<int64_t>(table, kRows, "table", fields == 0), fields,
                               as_ptr<int64_t>(idx, kRows, "idx", k == 0), k, scatter, dev.stream);
      });
#endif
}

}  // namespace retain
