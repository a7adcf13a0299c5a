// The slot contract the native runtime expects: the slot strategy recorded in the manifest (host-fp32,
// fused-int8, fused-int4) and the tensors SlotLayout.contract derives from it (kernels/strategies.py).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "bank.hpp"
#include "json.hpp"

namespace hm {

// A strategy made concrete: what the slot stores and its scale grid (rows per float16 scale; 0 for float).
struct SlotLayout {
  std::string strategy = "host-fp32";
  std::string storage = "float32";  // float32, int8 or int4
  int gate_up_group = 0, down_group = 0;

  bool quantized() const { return storage != "float32"; }
  int pack() const { return storage == "int4" ? 2 : 1; }  // codes per stored element
  std::string name() const;                                // the contract dtype: float32, int4-gu32-d16, ...
};

// One slot tensor as SlotTensor in hm_export/slot.py.
struct TensorSpec {
  std::string name, role, dtype;
  int layer = 0, memory_index = 0, hidden_axis = 0;
  std::vector<int> shape;  // [1, rows, cols]
  std::vector<std::string> sources;
  std::vector<std::vector<std::pair<int, int>>> level_ranges;  // [level][source] -> [lo, hi) on hidden_axis

  size_t element_size() const { return dtype == "float32" ? 4 : dtype == "float16" ? 2 : 1; }
  size_t nbytes() const { return element_size() * shape[1] * shape[2]; }
  // Byte offset of hidden index `lo` (a column for hidden_axis 2, a row for hidden_axis 1).
  size_t byte_offset(int lo) const { return element_size() * (hidden_axis == 2 ? lo : static_cast<size_t>(lo) * shape[2]); }
  size_t row_bytes() const { return element_size() * shape[2]; }
};

// The layout recorded in the manifest's slot section (strategy, gate_up_group, down_group); throws Error
// naming the strategy when the native runtime cannot run it, or the field when a group does not fit `dims`.
SlotLayout parse_layout(const json::Value& slot, const MemoryDims& dims);
// The slot tensors in contract order, exactly as SlotLayout.contract(cfg) in kernels/strategies.py.
std::vector<TensorSpec> expected_tensors(const MemoryDims& dims, const SlotLayout& layout);

}  // namespace hm
