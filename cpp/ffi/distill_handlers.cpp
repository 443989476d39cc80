// fastxent's distillation losses (fastxent/distill.hpp) as XLA FFI custom calls (CPU), for
// fastxent.jax.kl_div_with_logits / jsd_with_logits (python/fastxent/_jax_distill.py builds the
// calls). Like xla_handlers.cpp, the handlers read XLA's operand buffers and write its result
// buffers in place: no copy of the logits or gradients, no Python, no GIL.
//
// Operands of fastxent_distill / fastxent_distill_grad:
//   student   F32 | F64 | F16 | BF16, dims batch... + core (core_ndim dims, classes last)
//   teacher   the student's type and dims
//   weight    F32 | F64, batch... + rows (per-row weights, finite and >= 0), or 0 elements when
//             absent (every row weighs 1). F64 is read in place; F32 (JAX without x64) is
//             widened into a per-call vector of doubles (rows values: the kernel's type).
// Attributes: core_ndim, divergence (0 forward KL, 1 reverse KL, 2 JSD), beta, temperature,
// reduction (0 none, 1 sum, 2 mean), num_threads (0: default).
// Results: loss (F32 for 16-bit logits, else the logits' type; batch... for "mean"/"sum",
// batch... + rows for "none") and, for fastxent_distill_grad, the student's gradient and the
// teacher's (each the logits' type and dims, or 0 elements: not computed). Leading
// batch dims (jax.vmap, vmap_method="broadcast_all") are independent problems, one after
// another. The gradients may alias the logits (input_output_aliases): the kernel's in-place mode.
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastxent/distill.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace fastxent_ffi_distill {
namespace {

// Same threshold as xla_handlers.cpp: below it, without an explicit num_threads, the call runs
// on XLA's calling thread only (results do not depend on the thread count).
constexpr int64_t kXlaSerialElements = int64_t(1) << 21;

bool is_half(ffi::DataType t) { return t == ffi::DataType::F16 || t == ffi::DataType::BF16; }

struct Attrs {
  int64_t core_ndim, divergence, reduction, num_threads;
  double beta, temperature;
};

template <class S, class Lo>
ffi::Error run(const Attrs& A, int64_t batch, int64_t rows, int64_t C, const ffi::AnyBuffer& s,
               const ffi::AnyBuffer& t, const ffi::AnyBuffer& w, Lo* loss, S* gs, S* gt,
               fastxent::HalfKind half) {
  fastxent::DistillOptions opt;
  opt.divergence = static_cast<fastxent::Divergence>(A.divergence);
  opt.beta = A.beta;
  opt.temperature = A.temperature;
  opt.reduction = static_cast<fastxent::Reduction>(A.reduction);
  opt.num_threads = static_cast<int>(A.num_threads);
  if (opt.num_threads == 0 && rows * C < kXlaSerialElements) opt.num_threads = 1;
  const bool none = opt.reduction == fastxent::Reduction::None;
  const int64_t per = rows * C;
  const int64_t nw = static_cast<int64_t>(w.element_count());
  if (nw != 0 && nw != rows && nw != batch * rows)
    return ffi::Error::InvalidArgument("fastxent_distill: the row weights have the wrong size");
  const bool w64 = w.element_type() == ffi::DataType::F64;
  std::vector<double> wtmp, ltmp(none ? static_cast<size_t>(rows) : 0);
  const S* sp = static_cast<const S*>(s.untyped_data());
  const S* tp = static_cast<const S*>(t.untyped_data());
  for (int64_t b = 0; b < batch; ++b) {
    fastxent::DistillInputs<S> in;
    in.student = sp + b * per;
    in.teacher = tp + b * per;
    in.rows = rows;
    in.classes = C;
    in.student_stride = in.teacher_stride = C;
    in.half = half;
    if (nw != 0) {
      const int64_t off = (nw == batch * rows) ? b * rows : 0;
      if (w64) {
        in.row_weight = static_cast<const double*>(w.untyped_data()) + off;
      } else {
        const float* wf = static_cast<const float*>(w.untyped_data()) + off;
        wtmp.assign(wf, wf + rows);
        in.row_weight = wtmp.data();
      }
    }
    try {
      const double total =
          fastxent::distill<S>(in, opt, gs ? gs + b * per : nullptr, gt ? gt + b * per : nullptr,
                               none ? ltmp.data() : nullptr);
      if (none) {
        for (int64_t n = 0; n < rows; ++n) loss[b * rows + n] = Lo(ltmp[size_t(n)]);
      } else {
        loss[b] = Lo(total);  // rounded once, as fastxent.kl_div_with_logits does
      }
    } catch (const std::invalid_argument& e) {
      return ffi::Error::InvalidArgument(std::string("fastxent_distill: ") + e.what());
    } catch (const std::exception& e) {
      return ffi::Error::Internal(e.what());
    }
  }
  return ffi::Error::Success();
}

ffi::Error dispatch(const Attrs& A, const ffi::AnyBuffer& s, const ffi::AnyBuffer& t,
                    const ffi::AnyBuffer& w, ffi::AnyBuffer* loss, ffi::AnyBuffer* gs,
                    ffi::AnyBuffer* gt) {
  auto d = s.dimensions();
  const int64_t r = static_cast<int64_t>(d.size());
  if (A.core_ndim < 1 || A.core_ndim > r)
    return ffi::Error::InvalidArgument("fastxent_distill: bad core_ndim");
  int64_t batch = 1, rows = 1;
  for (int64_t i = 0; i < r - A.core_ndim; ++i) batch *= d[i];
  for (int64_t i = r - A.core_ndim; i < r - 1; ++i) rows *= d[i];
  const int64_t C = d[r - 1];
  const ffi::DataType xt = s.element_type();
  const ffi::DataType ct = is_half(xt) ? ffi::DataType::F32 : xt;
  const bool none = A.reduction == static_cast<int64_t>(fastxent::Reduction::None);
  const size_t n_loss = static_cast<size_t>(none ? batch * rows : batch);
  const bool want_gs = gs && gs->element_count() != 0;
  const bool want_gt = gt && gt->element_count() != 0;
  if (t.element_type() != xt || t.element_count() != s.element_count() ||
      (w.element_count() != 0 && w.element_type() != ffi::DataType::F32 &&
       w.element_type() != ffi::DataType::F64) ||
      loss->element_type() != ct || loss->element_count() != n_loss ||
      (want_gs && (gs->element_type() != xt || gs->element_count() != s.element_count())) ||
      (want_gt && (gt->element_type() != xt || gt->element_count() != s.element_count())))
    return ffi::Error::InvalidArgument("fastxent_distill: operand or result types do not match");
  if (C == 0) return ffi::Error::InvalidArgument("fastxent_distill: the class axis has no classes");
  if (batch * rows == 0) {  // nothing to read: "sum" and "mean" are 0, as the kernel's
    if (!none) {
      if (ct == ffi::DataType::F64)
        for (size_t i = 0; i < n_loss; ++i) loss->typed_data<double>()[i] = 0.0;
      else
        for (size_t i = 0; i < n_loss; ++i) loss->typed_data<float>()[i] = 0.0f;
    }
    return ffi::Error::Success();
  }
  switch (xt) {
    case ffi::DataType::F32:
      return run<float, float>(A, batch, rows, C, s, t, w, loss->typed_data<float>(),
                               want_gs ? gs->typed_data<float>() : nullptr,
                               want_gt ? gt->typed_data<float>() : nullptr,
                               fastxent::HalfKind::Float16);
    case ffi::DataType::F64:
      return run<double, double>(A, batch, rows, C, s, t, w, loss->typed_data<double>(),
                                 want_gs ? gs->typed_data<double>() : nullptr,
                                 want_gt ? gt->typed_data<double>() : nullptr,
                                 fastxent::HalfKind::Float16);
    case ffi::DataType::F16:
    case ffi::DataType::BF16:
      return run<uint16_t, float>(
          A, batch, rows, C, s, t, w, loss->typed_data<float>(),
          want_gs ? static_cast<uint16_t*>(gs->untyped_data()) : nullptr,
          want_gt ? static_cast<uint16_t*>(gt->untyped_data()) : nullptr,
          xt == ffi::DataType::F16 ? fastxent::HalfKind::Float16 : fastxent::HalfKind::BFloat16);
    default:
      return ffi::Error::InvalidArgument("fastxent_distill: logits must be F32, F64, F16 or BF16");
  }
}

ffi::Error loss_impl(ffi::AnyBuffer s, ffi::AnyBuffer t, ffi::AnyBuffer w,
                     ffi::Result<ffi::AnyBuffer> loss, int64_t core_ndim, int64_t divergence,
                     int64_t reduction, int64_t num_threads, double beta, double temperature) {
  return dispatch(Attrs{core_ndim, divergence, reduction, num_threads, beta, temperature}, s, t, w,
                  &*loss, nullptr, nullptr);
}

ffi::Error grad_impl(ffi::AnyBuffer s, ffi::AnyBuffer t, ffi::AnyBuffer w,
                     ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> gs,
                     ffi::Result<ffi::AnyBuffer> gt, int64_t core_ndim, int64_t divergence,
                     int64_t reduction, int64_t num_threads, double beta, double temperature) {
  return dispatch(Attrs{core_ndim, divergence, reduction, num_threads, beta, temperature}, s, t, w,
                  &*loss, &*gs, &*gt);
}

template <class B>
auto with_attrs(B&& b) {
  return std::move(b)
      .template Attr<int64_t>("core_ndim")
      .template Attr<int64_t>("divergence")
      .template Attr<int64_t>("reduction")
      .template Attr<int64_t>("num_threads")
      .template Attr<double>("beta")
      .template Attr<double>("temperature");
}

auto operands() {
  return ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>();
}

}  // namespace
}  // namespace fastxent_ffi_distill

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FastxentDistill, fastxent_ffi_distill::loss_impl,
    fastxent_ffi_distill::with_attrs(fastxent_ffi_distill::operands().Ret<ffi::AnyBuffer>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FastxentDistillGrad, fastxent_ffi_distill::grad_impl,
                              fastxent_ffi_distill::with_attrs(fastxent_ffi_distill::operands()
                                                                   .Ret<ffi::AnyBuffer>()
                                                                   .Ret<ffi::AnyBuffer>()
                                                                   .Ret<ffi::AnyBuffer>()));
