#include "slot.hpp"

#include <map>

#include "hm_runtime.hpp"

namespace hm {
namespace {

using Ranges = std::vector<std::vector<std::pair<int, int>>>;

Ranges scaled(const Ranges& ranges, int divisor) {
  Ranges out = ranges;
  for (auto& level : out)
    for (auto& [lo, hi] : level) lo /= divisor, hi /= divisor;
  return out;
}

// SlotContract.for_model: per memory layer gate_up [1, d, 2R] (gate and up columns) and down [1, R, d] (rows).
std::vector<TensorSpec> float_tensors(const MemoryDims& dims) {
  const int d = dims.d_model, width = dims.total_width();
  std::vector<TensorSpec> out;
  for (size_t index = 0; index < dims.layers.size(); ++index) {
    TensorSpec gate_up, down;
    const std::string prefix = "mem" + std::to_string(dims.layers[index]);
    gate_up.name = prefix + "_gate_up", down.name = prefix + "_down";
    gate_up.role = "gate_up", down.role = "down";
    gate_up.dtype = down.dtype = "float32";
    gate_up.layer = down.layer = dims.layers[index];
    gate_up.memory_index = down.memory_index = static_cast<int>(index);
    gate_up.hidden_axis = 2, down.hidden_axis = 1;
    gate_up.shape = {1, d, 2 * width}, down.shape = {1, width, d};
    gate_up.sources = {"gate", "up"}, down.sources = {"down"};
    for (int level = 0; level < dims.num_levels(); ++level) {
      const int lo = dims.offset(level), hi = lo + dims.widths[level];
      gate_up.level_ranges.push_back({{lo, hi}, {lo + width, hi + width}});
      down.level_ranges.push_back({{lo, hi}});
    }
    out.push_back(gate_up);
    out.push_back(down);
  }
  return out;
}

[[noreturn]] void refuse_field(const std::string& field, const std::string& why) {
  throw Error("slot." + field + ": " + why);
}

}  // namespace

std::string SlotLayout::name() const {
  if (!quantized()) return storage;
  return storage + "-gu" + std::to_string(gate_up_group) + "-d" + std::to_string(down_group);
}

SlotLayout parse_layout(const json::Value& slot, const MemoryDims& dims) {
  SlotLayout layout;
  if (const json::Value* strategy = slot.find("strategy")) layout.strategy = strategy->as_string("slot.strategy");
  static const std::map<std::string, std::string> supported = {
      {"host-fp32", "float32"}, {"fused-int8", "int8"}, {"fused-int4", "int4"}};
  auto it = supported.find(layout.strategy);
  if (it == supported.end())
    refuse_field("strategy", "slot strategy '" + layout.strategy +
                                 "' is not supported by the native runtime (it runs host-fp32, fused-int8 and "
                                 "fused-int4; re-export with --slot-strategy fused-int4 or host-fp32)");
  layout.storage = it->second;
  if (!layout.quantized()) return layout;
  auto group = [&](const char* key) {
    const json::Value* value = slot.find(key);
    if (value == nullptr) refuse_field(key, "missing (a " + layout.strategy + " slot records its scale grid)");
    return static_cast<int>(value->as_int(std::string("slot.") + key));
  };
  layout.gate_up_group = group("gate_up_group");
  layout.down_group = group("down_group");
  if (layout.gate_up_group <= 0 || dims.d_model % layout.gate_up_group != 0)
    refuse_field("gate_up_group", std::to_string(layout.gate_up_group) + " does not divide d_model " +
                                      std::to_string(dims.d_model));
  for (int width : dims.widths)
    if (layout.down_group <= 0 || width % layout.down_group != 0)
      refuse_field("down_group", std::to_string(layout.down_group) + " does not divide level width " +
                                     std::to_string(width));
  if (layout.storage == "int4") {
    bool odd = dims.d_model % 2 != 0;
    for (int width : dims.widths) odd = odd || width % 2 != 0;
    if (odd) refuse_field("strategy", "an int4 slot packs column pairs: d_model and every width must be even");
  }
  return layout;
}

std::vector<TensorSpec> expected_tensors(const MemoryDims& dims, const SlotLayout& layout) {
  std::vector<TensorSpec> base = float_tensors(dims);
  if (!layout.quantized()) return base;
  const int pack = layout.pack();
  std::vector<TensorSpec> out;
  for (const TensorSpec& tensor : base) {
    const int rows = tensor.shape[1], cols = tensor.shape[2];
    const bool gate_up = tensor.role == "gate_up";
    const int group = gate_up ? layout.gate_up_group : layout.down_group;
    TensorSpec codes = tensor, scales = tensor;
    codes.dtype = pack == 2 ? "uint8" : "int8";
    codes.shape = {1, rows, cols / pack};
    // gate_up: the levels are columns (int4 halves them, scales keep them); down: rows (scales: rows / group)
    codes.level_ranges = gate_up ? scaled(tensor.level_ranges, pack) : tensor.level_ranges;
    scales.name += "_scales", scales.role += "_scales", scales.dtype = "float16";
    scales.shape = {1, rows / group, cols};
    scales.level_ranges = gate_up ? tensor.level_ranges : scaled(tensor.level_ranges, group);
    out.push_back(codes);
    out.push_back(scales);
  }
  return out;
}

}  // namespace hm
