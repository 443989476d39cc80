// The 16-bit entry point (cross_entropy_half): float16 / bfloat16 logits, read and rounded by
// the SIMD passes row by row, or converted in fixed chunks through the float32 path (column
// layout, short rows, few rows over many classes). The math is float32 throughout.
#include <algorithm>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "ce_driver.hpp"
#include "threads.hpp"

namespace fastxent {

namespace {

// Elements per float32 chunk of 16-bit logits (1 MiB as float32).
constexpr int64_t kHalfChunk = 1 << 18;

}  // namespace

using namespace detail;

double cross_entropy_half(const HalfInputs& in, const Options& opt, uint16_t* grad,
                          float* row_losses) {
  return cross_entropy_half(in, opt, grad, row_losses, nullptr);
}

double cross_entropy_half(const HalfInputs& in, const Options& opt, uint16_t* grad,
                          float* row_losses, const RowOutputs<float>* outs) {
  check_call(opt, in.rows, in.classes, in.inner, in.row_stride, in.logits != nullptr,
             in.target != nullptr, in.probs != nullptr, in.probs_row_stride, row_losses != nullptr,
             grad != nullptr && grad == in.logits);
  check_cap_in<float>(opt.softcap, "float32 (the math of 16-bit logits)");
  const RowOutputs<float> o = outs ? *outs : RowOutputs<float>{};
  const bool extras = wants_extras(o, opt, in.inner, in.probs != nullptr);
  const Prepared pr = prepare(opt, in.rows, in.classes, in.inner, in.target, in.probs != nullptr,
                              in.weight, in.sample_weight);
  const KernelTable& table = active_table();
  // The one mapping of the public HalfKind onto the kernel's Storage.
  const Storage storage = in.kind == HalfKind::Float16 ? Storage::Float16 : Storage::BFloat16;
  const int64_t C = in.classes, rows = in.rows;
  // (Short rows take the chunked float32 path below, so that they run through the same
  // short-row kernel as float32 logits: the same bits, rounded once; so do per-row outputs and
  // the entropy term, which the float32 row path computes.)
  if (in.inner == 1 && !extras && !(C <= short_row_classes() && rows > 1) &&
      !(thread_count(opt, rows * C) > 1 && rows < thread_count(opt, rows * C) && pr.nb > 1)) {
    // Rows: one parallel region; each thread converts a row into its own float32 buffer, runs
    // the float32 row through the kernel in place there, and rounds the gradient out once.
    Inputs<float> ci;
    ci.rows = rows;
    ci.classes = C;
    ci.row_stride = C;
    ci.target = in.target;
    ci.probs = nullptr;
    ci.weight = in.weight;
    ci.sample_weight = in.sample_weight;
    Problem<float> p = make_problem(ci, opt, static_cast<float*>(nullptr), pr);
    p.probs = in.probs != nullptr;
    std::vector<double> losses(static_cast<size_t>(rows));
    const int nt = thread_count(opt, rows * C);
    const int team = int(std::min<int64_t>(nt, std::max<int64_t>(rows, 1)));
    auto run_rows = [&](int64_t begin, int64_t end) {
      // e = exp(z' - m) of a row in float32 (the 16-bit logits are read, and the gradient
      // written, by the SIMD passes themselves), and the row's probability targets.
      std::vector<float> ef(grad ? size_t(C) : 0), pf(in.probs ? size_t(C) : 0);
      std::vector<BlockStat> st(static_cast<size_t>(pr.nb));
      std::vector<float> tbuf(opt.softcap > 0.0 && grad ? size_t(C) : 0);
      for (int64_t n = begin; n < end; ++n) {
        if (in.probs) table.half_to_f32(in.probs + n * in.probs_row_stride, pf.data(), C, storage);
        RowPtrs<float> rp{nullptr, in.probs ? pf.data() : nullptr, nullptr};
        rp.zh = in.logits + n * in.row_stride;
        rp.gh = grad ? grad + n * C : nullptr;
        rp.storage = storage;
        losses[size_t(n)] = compute_row(p, n, rp, st.data(), grad ? ef.data() : nullptr,
                                        tbuf.empty() ? nullptr : tbuf.data());
      }
    };
    parallel_chunks(team, rows, run_rows);
    return reduce(opt, pr, losses.data(), rows, row_losses);
  }
  // The column layout, short rows, few rows over many classes, or per-row outputs: fixed
  // chunks through the float32 path.
  // Chunks of whole rows (whole (C, inner) slices in the column layout) of about kHalfChunk
  // elements: fixed, so the work split never depends on the thread count.
  const int64_t slice = in.inner > 1 ? C * in.inner : C;
  const int64_t per = std::max<int64_t>(1, kHalfChunk / slice);  // slices per chunk
  const int64_t nslices = in.inner > 1 ? rows / in.inner : rows;
  std::vector<float> zf(static_cast<size_t>(std::min(per, std::max<int64_t>(nslices, 1)) * slice));
  std::vector<float> pf(in.probs ? zf.size() : 0);
  std::vector<double> losses(static_cast<size_t>(rows));
  const int nt = thread_count(opt, rows * C);

  // Converts `count` slices starting at slice s0 between the strided 16-bit array and a
  // contiguous float buffer, in parallel over slices.
  auto convert = [&](auto fn, int64_t s0, int64_t count, int64_t ld, auto* half, auto* flt) {
    const int team = (count * slice >= kSerialGrain) ? nt : 1;
    (void)team;  // only read by the OpenMP pragma
#if defined(_OPENMP)
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
#endif
    for (int64_t k = 0; k < count; ++k) fn(half + (s0 + k) * ld, flt + k * slice, k);
  };
  const int64_t zld = in.inner > 1 ? slice : in.row_stride;
  const int64_t pld = in.inner > 1 ? slice : in.probs_row_stride;

  for (int64_t s0 = 0; s0 < nslices; s0 += per) {
    const int64_t count = std::min(per, nslices - s0);
    convert([&](const uint16_t* h, float* f, int64_t) { table.half_to_f32(h, f, slice, storage); },
            s0, count, zld, in.logits, zf.data());
    if (in.probs)
      convert(
          [&](const uint16_t* h, float* f, int64_t) { table.half_to_f32(h, f, slice, storage); },
          s0, count, pld, in.probs, pf.data());
    const int64_t r0 = in.inner > 1 ? s0 * in.inner : s0;
    Inputs<float> ci;
    ci.logits = zf.data();
    ci.rows = in.inner > 1 ? count * in.inner : count;
    ci.classes = C;
    ci.row_stride = C;
    ci.inner = in.inner;
    ci.target = in.target ? in.target + r0 : nullptr;
    ci.probs = in.probs ? pf.data() : nullptr;
    ci.probs_row_stride = C;
    ci.weight = in.weight;
    ci.sample_weight = in.sample_weight ? in.sample_weight + r0 : nullptr;
    // The gradient overwrites the float chunk in place, then is rounded once to 16 bits.
    Problem<float> p = make_problem(ci, opt, grad ? zf.data() : nullptr, pr);
    if (extras) {
      // Row n of the chunk is row r0 + n of the call.
      RowOutputs<float> oc;
      oc.lse = o.lse ? o.lse + r0 : nullptr;
      oc.entropy = o.entropy ? o.entropy + r0 : nullptr;
      oc.argmax = o.argmax ? o.argmax + r0 : nullptr;
      oc.target_logprob = o.target_logprob ? o.target_logprob + r0 : nullptr;
      enable_extras(p, oc, opt, true);
    }
    run_problem(p, nt, losses.data() + r0);
    if (grad)
      convert([&](uint16_t* h, float* f, int64_t) { table.f32_to_half(f, h, slice, storage); }, s0,
              count, slice, grad, zf.data());
  }
  return reduce(opt, pr, losses.data(), rows, row_losses);
}

}  // namespace fastxent
