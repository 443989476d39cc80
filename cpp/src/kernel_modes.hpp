// The compile-time modes of the passes, and the one helper that turns a mode into its
// instantiation. A mode packs a pass's template parameters (named enums and flags) into an
// index; each pass keeps a constexpr table of function pointers, one per index, filled by its
// entry<I>() with the instantiation for that mode where the mode is reachable and null
// elsewhere. The set of instantiations is therefore explicit: reachable() below. A dispatch
// builds the mode from its inputs and makes one indirect call (once per block or tile).
#pragma once

#include <array>
#include <cstddef>
#include <utility>

#include "kernel_table.hpp"

#ifndef FASTXENT_ISA_NS
#error "define FASTXENT_ISA_NS (the ISA namespace) before including this header"
#endif

namespace fastxent {
namespace FASTXENT_ISA_NS {

// The table of Owner::entry<I>() for every index I of a mode.
template <class Fn, class Owner, int... I>
constexpr std::array<Fn, sizeof...(I)> mode_table(std::integer_sequence<int, I...>) {
  return {{Owner::template entry<I>()...}};
}

// The row block pass (Row::block_impl).
struct BlockMode {
  bool store = false;                  // e = exp(z' - m') is stored (BlockIn::e)
  Transform tr = Transform::Identity;  // z -> z'
  TargetSums sums = TargetSums::None;  // the sums besides sum exp
  bool has_w = false;                  // class weights are read
  Storage storage = Storage::Native;   // how the logits are read
  bool side = false;                   // another row's gradient block is written alongside
  bool next = false;                   // the next block's max is taken alongside

  static constexpr int kCount = 2 * 4 * 3 * 2 * 3 * 2 * 2;
  static constexpr auto indices() { return std::make_integer_sequence<int, kCount>(); }
  constexpr int index() const {
    int i = int(store);
    i = i * 4 + int(tr);
    i = i * 3 + int(sums);
    i = i * 2 + int(has_w);
    i = i * 3 + int(storage);
    i = i * 2 + int(side);
    return i * 2 + int(next);
  }
  static constexpr BlockMode at(int i) {
    BlockMode m;
    m.next = i % 2 != 0;
    i /= 2;
    m.side = i % 2 != 0;
    i /= 2;
    m.storage = Storage(i % 3);
    i /= 3;
    m.has_w = i % 2 != 0;
    i /= 2;
    m.sums = TargetSums(i % 3);
    i /= 3;
    m.tr = Transform(i % 4);
    i /= 4;
    m.store = i % 2 != 0;
    return m;
  }
  // The instantiation set: the modes Row::run_block can build, no other (is_float: T = float).
  constexpr bool reachable(bool is_float) const {
    if (storage != Storage::Native && !is_float) return false;  // 16-bit storage: float only
    if (side && !(store && storage == Storage::Native)) return false;  // the streamed rows
    if (next && (storage != Storage::Native || tr == Transform::SoftcapFixedShift)) return false;
    if (sums == TargetSums::None && has_w && !side) return false;  // no sum reads weights
    return true;
  }
};

// The column statistics pass (Col::stats_impl).
struct ColMode {
  bool store = false;                  // e (and rho with a softcap) are stored (ColIn::e)
  Transform tr = Transform::Identity;
  TargetSums sums = TargetSums::None;
  bool has_w = false;                  // class weights are read

  static constexpr int kCount = 2 * 4 * 3 * 2;
  static constexpr auto indices() { return std::make_integer_sequence<int, kCount>(); }
  constexpr int index() const {
    return ((int(store) * 4 + int(tr)) * 3 + int(sums)) * 2 + int(has_w);
  }
  static constexpr ColMode at(int i) {
    ColMode m;
    m.has_w = i % 2 != 0;
    i /= 2;
    m.sums = TargetSums(i % 3);
    i /= 3;
    m.tr = Transform(i % 4);
    i /= 4;
    m.store = i % 2 != 0;
    return m;
  }
  // The instantiation set: weights are read only by a sum.
  constexpr bool reachable() const { return !(sums == TargetSums::None && has_w); }
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
