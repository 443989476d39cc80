// The compile-time modes of the passes, and the one helper that turns a mode into its
// instantiation. A mode packs a pass's template parameters (named enums and flags) into an
// index; each pass keeps a constexpr table of function pointers, one per index, filled by its
// entry<I>() with the instantiation for that mode where the mode is reachable and null
// elsewhere. The set of instantiations is therefore explicit: reachable() below. A dispatch
// builds the mode from its inputs and makes one indirect call (once per block or tile).
#pragma once

#include <array>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "isa_ns.hpp"
#include "kernel_table.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

// Runtime flags into template arguments, for a pass whose instantiations are every
// combination of a few flags: with_flags(f, a, b, ...) calls f(std::bool_constant<a>{},
// std::bool_constant<b>{}, ...) through a tree of branches, one per flag (a's first), and
// returns what f returns. f reads the values as decltype(x)::value.
template <bool... Done, class F>
inline decltype(auto) with_flags(F&& f) {
  return f(std::bool_constant<Done>{}...);
}
template <bool... Done, class F, class... Rest>
inline decltype(auto) with_flags(F&& f, bool flag, Rest... rest) {
  if (flag) return with_flags<Done..., true>(f, rest...);
  return with_flags<Done..., false>(f, rest...);
}

// The table of Owner::entry<I>() for every index I of a mode.
template <class Fn, class Owner, int... I>
constexpr std::array<Fn, sizeof...(I)> mode_table(std::integer_sequence<int, I...>) {
  return {{Owner::template entry<I>()...}};
}

// A mode's index taken apart, last field first (a mixed-radix number).
struct Digits {
  int rest;
  constexpr int take(int radix) {
    const int d = rest % radix;
    rest /= radix;
    return d;
  }
};

// The row block pass (Row::block_impl).
struct BlockMode {
  bool store = false;                  // e = exp(z' - m') is stored (BlockIn::e)
  Transform tr = Transform::Identity;  // z -> z'
  TargetSums sums = TargetSums::None;  // the sums besides sum exp
  bool has_w = false;                  // class weights are read
  Storage storage = Storage::Native;   // how the logits are read
  bool side = false;                   // another row's gradient block is written alongside
  bool next = false;                   // the next block's max is taken alongside
  bool ent = false;                    // the entropy sum sum e (z' - m') (BlockIn::entropy)

  static constexpr int kCount = 2 * 4 * 3 * 2 * 3 * 2 * 2 * 2;
  static constexpr auto indices() { return std::make_integer_sequence<int, kCount>(); }
  constexpr int index() const {
    const int i = ((int(store) * 4 + int(tr)) * 3 + int(sums)) * 2 + int(has_w);
    return (((i * 3 + int(storage)) * 2 + int(side)) * 2 + int(next)) * 2 + int(ent);
  }
  static constexpr BlockMode at(int i) {
    BlockMode m;
    Digits d{i};
    m.ent = d.take(2) != 0;
    m.next = d.take(2) != 0, m.side = d.take(2) != 0, m.storage = Storage(d.take(3));
    m.has_w = d.take(2) != 0, m.sums = TargetSums(d.take(3)), m.tr = Transform(d.take(4));
    m.store = d.take(2) != 0;
    return m;
  }
  // The instantiation set: the modes Row::run_block can build, no other (is_float: T = float).
  constexpr bool reachable(bool is_float) const {
    if (storage != Storage::Native && !is_float) return false;         // 16-bit storage: float only
    if (side && !(store && storage == Storage::Native)) return false;  // the streamed rows
    if (next && (storage != Storage::Native || tr == Transform::SoftcapFixedShift)) return false;
    if (sums == TargetSums::None && has_w && !side) return false;  // no sum reads weights
    // The entropy sum: T storage, rows one at a time (no streamed side).
    if (ent && (storage != Storage::Native || side)) return false;
    return true;
  }
};

// The column statistics pass (Col::stats_impl).
struct ColMode {
  bool store = false;  // e (and rho with a softcap) are stored (ColIn::e)
  Transform tr = Transform::Identity;
  TargetSums sums = TargetSums::None;
  bool has_w = false;  // class weights are read

  static constexpr int kCount = 2 * 4 * 3 * 2;
  static constexpr auto indices() { return std::make_integer_sequence<int, kCount>(); }
  constexpr int index() const {
    return ((int(store) * 4 + int(tr)) * 3 + int(sums)) * 2 + int(has_w);
  }
  static constexpr ColMode at(int i) {
    ColMode m;
    Digits d{i};
    m.has_w = d.take(2) != 0, m.sums = TargetSums(d.take(3)), m.tr = Transform(d.take(4));
    m.store = d.take(2) != 0;
    return m;
  }
  // The instantiation set: weights are read only by a sum.
  constexpr bool reachable() const { return !(sums == TargetSums::None && has_w); }
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
