// fastxent's kernels as XLA FFI custom calls (CPU), for fastxent.jax.
//
// The handlers read XLA's operand buffers and write XLA's result buffers in place through the
// public C++ API (fastxent/fastxent.hpp): no copy of the logits, probabilities or gradient, no
// Python, no GIL. They are compiled against the XLA FFI headers of the jaxlib found at build
// time (cmake/jax_ffi.cmake) and exported as PyCapsules by cpp/ffi/module.cpp.
//
// Operands of fastxent_ce / fastxent_ce_grad (python/fastxent/_jax_ffi.py builds them):
//   logits   F32 | F64 | F16 | BF16, dims batch... + core (core_ndim dims, class axis `axis`)
//   target   any integer type, dims batch... + rows (the core without the class axis); or,
//            with FLAG_PROBS, probabilities of the logits' type and dims
//   weight   compute type (F32 for 16-bit logits), batch... + [C], or 0 elements when absent
//   sweight  compute type, batch... + rows, or 0 elements when absent
//   scalars  F32 | F64, batch... + [3]: label smoothing, normalizer, entropy_coef (read where
//            the flags say)
// Results: loss (compute type; batch... for "mean"/"sum", batch... + rows for "none") and, for
// fastxent_ce_grad, the gradient (the logits' type and dims). fastxent_ce_stats (the class
// axis last) returns the loss, the gradient and the per-row outputs lse, entropy (compute
// type), argmax (S32 | S64) and target_logprob (compute type), each of
// batch... + rows elements, or 0 elements when not asked for (the gradient too: forward only).
// Leading batch dims (from jax.vmap, vmap_method="broadcast_all") are independent problems,
// computed one after another. An operand whose element count lacks the batch factor is shared by
// every batch element.
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fastxent/fastxent.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace fastxent_ffi {

enum Flags : int64_t {
  FLAG_PROBS = 1,
  FLAG_WEIGHT = 2,
  FLAG_SWEIGHT = 4,
  FLAG_EPS_OPERAND = 8,    // label smoothing read from scalars[0]
  FLAG_NORMALIZER = 16,    // "mean" divides by a normalizer ...
  FLAG_NORM_OPERAND = 32,  // ... read from scalars[1] (else the `normalizer` attribute)
  FLAG_BETA_OPERAND = 64,  // entropy_coef read from scalars[2] (else its attribute)
};

namespace {

struct Layout {
  int64_t batch = 1, rows = 0, classes = 0, inner = 1;
  std::vector<int64_t> index_dims;  // batch... + rows: for naming a bad target
};

ffi::ErrorOr<Layout> layout_of(const ffi::AnyBuffer& x, int64_t core_ndim, int64_t axis) {
  auto d = x.dimensions();
  const int64_t r = static_cast<int64_t>(d.size());
  if (core_ndim < 1 || core_ndim > r || axis < 0 || axis >= core_ndim)
    return ffi::Unexpected(ffi::Error::InvalidArgument("fastxent_ce: bad core_ndim or axis"));
  Layout L;
  const int64_t b0 = r - core_ndim;
  int64_t outer = 1;
  for (int64_t i = 0; i < r; ++i) {
    if (i < b0) L.batch *= d[i];
    else if (i - b0 < axis) outer *= d[i];
    else if (i - b0 > axis) L.inner *= d[i];
    else L.classes = d[i];
    if (i - b0 != axis) L.index_dims.push_back(d[i]);
  }
  L.rows = outer * L.inner;
  return L;
}

// Per-batch-element pointer into an operand: batched when it holds batch * per elements.
template <class P>
P* at(const ffi::AnyBuffer& a, int64_t b, int64_t batch, int64_t per) {
  if (a.element_count() == 0) return nullptr;
  const int64_t n = static_cast<int64_t>(a.element_count());
  char* base = static_cast<char*>(a.untyped_data());
  const int64_t off = (n == batch * per && batch > 1) ? b * per : 0;
  return reinterpret_cast<P*>(base + off * static_cast<int64_t>(ffi::ByteWidth(a.element_type())));
}

template <class I>
void widen(const void* p, int64_t n, int64_t* out) {
  const I* s = static_cast<const I*>(p);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int64_t>(s[i]);
}

// Class targets as int64: S64 is read in place, other integer types widened into `tmp`.
ffi::ErrorOr<const int64_t*> targets_of(const ffi::AnyBuffer& t, int64_t b, const Layout& L,
                                        std::vector<int64_t>& tmp) {
  if (static_cast<int64_t>(t.element_count()) != L.batch * L.rows)
    return ffi::Unexpected(ffi::Error::InvalidArgument("fastxent_ce: target has the wrong size"));
  const int64_t n = L.rows;
  const auto ty = t.element_type();
  if (ty == ffi::DataType::S64) return at<const int64_t>(t, b, L.batch, n);
  tmp.resize(static_cast<size_t>(n));
  const void* p = at<const char>(t, b, L.batch, n);
  switch (ty) {
    case ffi::DataType::S8: widen<int8_t>(p, n, tmp.data()); break;
    case ffi::DataType::S16: widen<int16_t>(p, n, tmp.data()); break;
    case ffi::DataType::S32: widen<int32_t>(p, n, tmp.data()); break;
    case ffi::DataType::U8: widen<uint8_t>(p, n, tmp.data()); break;
    case ffi::DataType::U16: widen<uint16_t>(p, n, tmp.data()); break;
    case ffi::DataType::U32: widen<uint32_t>(p, n, tmp.data()); break;
    default:
      return ffi::Unexpected(ffi::Error::InvalidArgument("fastxent_ce: unsupported target type"));
  }
  return static_cast<const int64_t*>(tmp.data());
}

constexpr int64_t kScalars = 3;

double scalar_at(const ffi::AnyBuffer& s, int64_t b, int64_t batch, int64_t k) {
  if (s.element_type() == ffi::DataType::F64) return at<const double>(s, b, batch, kScalars)[k];
  return at<const float>(s, b, batch, kScalars)[k];
}

// The message of fastxent's IndexError, naming the first bad target by its full index.
std::string bad_target(const int64_t* t, int64_t b, const Layout& L, int64_t ignore_index) {
  for (int64_t n = 0; n < L.rows; ++n) {
    const int64_t y = t[n];
    if (y == ignore_index || (y >= 0 && y < L.classes)) continue;
    int64_t flat = b * L.rows + n;
    std::string idx;
    for (size_t i = L.index_dims.size(); i-- > 0;) {
      const int64_t d = L.index_dims[i] > 0 ? L.index_dims[i] : 1;
      idx = std::to_string(flat % d) + (idx.empty() ? "" : ", ") + idx;
      flat /= d;
    }
    return "target[" + idx + "] = " + std::to_string(y) + " is out of range: class indices " +
           "must be in [0, " + std::to_string(L.classes) + ") or equal ignore_index (" +
           std::to_string(ignore_index) + ")";
  }
  return "a class target is out of range";
}

constexpr int64_t kXlaSerialElements = int64_t(1) << 21;

struct Attrs {
  int64_t core_ndim, axis, reduction, ignore_index, flags, num_threads;
  double eps, normalizer, z_loss, softcap, logit_scale, entropy_coef;
};

struct Operands {
  ffi::AnyBuffer x, t, w, sw, sc;
};

// The per-row results of fastxent_ce_stats (null: not asked for).
template <class T>
struct StatPtrs {
  T* lse = nullptr;
  T* entropy = nullptr;
  T* target_logprob = nullptr;
  void* argmax = nullptr;  // int64_t, or int32_t with argmax32
  bool argmax32 = false;
  bool any() const { return lse || entropy || target_logprob || argmax; }
};

// The kernel call `fn(outputs)` for batch element b (of `rows` rows), with its per-row outputs
// where asked for (null otherwise; an S32 argmax through `am64`, narrowed after the call).
template <class T, class Fn>
double with_outputs(int64_t rows, int64_t b, const StatPtrs<T>& sp, std::vector<int64_t>& am64,
                    Fn fn) {
  if (!sp.any()) return fn(static_cast<const fastxent::RowOutputs<T>*>(nullptr));
  const int64_t off = b * rows;
  fastxent::RowOutputs<T> ro;
  if (sp.lse) ro.lse = sp.lse + off;
  if (sp.entropy) ro.entropy = sp.entropy + off;
  if (sp.target_logprob) ro.target_logprob = sp.target_logprob + off;
  if (sp.argmax && sp.argmax32) {
    am64.resize(static_cast<size_t>(rows));
    ro.argmax = am64.data();
  } else if (sp.argmax) {
    ro.argmax = static_cast<int64_t*>(sp.argmax) + off;
  }
  const double r = fn(&ro);
  if (sp.argmax && sp.argmax32) {
    int32_t* d = static_cast<int32_t*>(sp.argmax) + off;
    for (int64_t i = 0; i < rows; ++i) d[i] = static_cast<int32_t>(am64[i]);
  }
  return r;
}

// Runs every batch element through `call` (the float kernel or the 16-bit one). In: the
// fastxent input struct, S: logits storage, W: weight type, Lo: loss type.
template <class In, class S, class W, class Lo, class Call>
ffi::Error run_all(const Attrs& A, const Layout& L, const Operands& op, In proto, Lo* loss, S* grad,
                   Call call) {
  fastxent::Options opt;
  opt.reduction = static_cast<fastxent::Reduction>(A.reduction);
  opt.ignore_index = A.ignore_index;
  opt.z_loss = A.z_loss;
  opt.softcap = A.softcap;
  opt.logit_scale = A.logit_scale;
  opt.num_threads = static_cast<int>(A.num_threads);
  // Without an explicit num_threads, a problem below kXlaSerialElements runs on XLA's calling
  // thread only: next to XLA's own spinning thread pool, OpenMP workers cost more than they
  // save at that size (they can lose whole scheduler time slices). Results do not depend on it.
  if (opt.num_threads == 0 && L.rows * L.classes < kXlaSerialElements) opt.num_threads = 1;
  opt.has_normalizer = (A.flags & FLAG_NORMALIZER) != 0;
  opt.entropy_coef = A.entropy_coef;
  const bool none = opt.reduction == fastxent::Reduction::None;
  const int64_t per = L.rows * L.classes;
  std::vector<int64_t> tmp;
  for (int64_t b = 0; b < L.batch; ++b) {
    In in = proto;
    in.rows = L.rows;
    in.classes = L.classes;
    in.inner = L.inner;
    in.row_stride = L.classes * L.inner;  // unused when inner > 1
    in.logits = at<const S>(op.x, b, L.batch, per);
    if (A.flags & FLAG_PROBS) {
      in.probs = at<const S>(op.t, b, L.batch, per);
      in.probs_row_stride = in.row_stride;
    } else {
      auto t = targets_of(op.t, b, L, tmp);
      if (t.has_error()) return t.error();
      in.target = t.value();
    }
    if (A.flags & FLAG_WEIGHT) in.weight = at<const W>(op.w, b, L.batch, L.classes);
    if (A.flags & FLAG_SWEIGHT) in.sample_weight = at<const W>(op.sw, b, L.batch, L.rows);
    opt.label_smoothing = (A.flags & FLAG_EPS_OPERAND) ? scalar_at(op.sc, b, L.batch, 0) : A.eps;
    opt.normalizer = (A.flags & FLAG_NORM_OPERAND) ? scalar_at(op.sc, b, L.batch, 1) : A.normalizer;
    if (A.flags & FLAG_BETA_OPERAND) opt.entropy_coef = scalar_at(op.sc, b, L.batch, 2);
    Lo* rl = none ? loss + b * L.rows : nullptr;
    S* g = grad ? grad + b * per : nullptr;
    if (L.rows == 0) {  // nothing to read or write; "sum" and "mean" are 0 (the D = 0 rule)
      if (!none) loss[b] = Lo(0);
      continue;
    }
    try {
      const double total = call(in, opt, g, rl, b);
      if (!none) loss[b] = Lo(total);  // rounded once, as fastxent.cross_entropy does
    } catch (const std::out_of_range& e) {
      return ffi::Error::InvalidArgument(in.target ? bad_target(in.target, b, L, opt.ignore_index)
                                                   : e.what());
    } catch (const std::invalid_argument& e) {
      return ffi::Error::InvalidArgument(e.what());
    } catch (const std::exception& e) {
      return ffi::Error::Internal(e.what());
    }
  }
  return ffi::Error::Success();
}

bool is_half(ffi::DataType t) { return t == ffi::DataType::F16 || t == ffi::DataType::BF16; }

// The per-row results of fastxent_ce_stats (lse, entropy, argmax, target_logprob), each null or
// of 0 elements when not asked for.
struct StatResults {
  ffi::AnyBuffer *lse = nullptr, *entropy = nullptr, *argmax = nullptr, *target_logprob = nullptr;
};

ffi::ErrorOr<bool> stat_ok(const ffi::AnyBuffer* r, ffi::DataType want, int64_t n) {
  if (r == nullptr || r->element_count() == 0) return false;
  if (r->element_type() != want || static_cast<int64_t>(r->element_count()) != n)
    return ffi::Unexpected(
        ffi::Error::InvalidArgument("fastxent_ce_stats: a per-row result has the wrong type"));
  return true;
}

template <class T>
ffi::ErrorOr<StatPtrs<T>> stat_ptrs(const StatResults& st, ffi::DataType ct, int64_t n,
                                    int64_t classes) {
  StatPtrs<T> sp;
  ffi::AnyBuffer* const fl[3] = {st.lse, st.entropy, st.target_logprob};
  T** dst[3] = {&sp.lse, &sp.entropy, &sp.target_logprob};
  for (int k = 0; k < 3; ++k) {
    auto ok = stat_ok(fl[k], ct, n);
    if (ok.has_error()) return ffi::Unexpected(ok.error());
    if (ok.value()) *dst[k] = static_cast<T*>(fl[k]->untyped_data());
  }
  if (st.argmax && st.argmax->element_count() != 0) {
    const ffi::DataType at = st.argmax->element_type();
    sp.argmax32 = at == ffi::DataType::S32;
    if (sp.argmax32 && classes > INT32_MAX)
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          "fastxent_ce_stats: more classes than an int32 argmax holds (enable x64)"));
    auto ok = stat_ok(st.argmax, sp.argmax32 ? ffi::DataType::S32 : ffi::DataType::S64, n);
    if (ok.has_error()) return ffi::Unexpected(ok.error());
    sp.argmax = st.argmax->untyped_data();
  }
  return sp;
}

ffi::Error dispatch(const Attrs& A, const Operands& op, ffi::AnyBuffer* loss, ffi::AnyBuffer* grad,
                    const StatResults& st = {}) {
  auto lay = layout_of(op.x, A.core_ndim, A.axis);
  if (lay.has_error()) return lay.error();
  const Layout& L = lay.value();
  const ffi::DataType xt = op.x.element_type();
  const ffi::DataType ct = is_half(xt) ? ffi::DataType::F32 : xt;
  const bool none = A.reduction == static_cast<int64_t>(fastxent::Reduction::None);
  const int64_t n_loss = none ? L.batch * L.rows : L.batch;
  const bool bad_w = (A.flags & FLAG_WEIGHT) && op.w.element_type() != ct;
  const bool bad_sw = (A.flags & FLAG_SWEIGHT) && op.sw.element_type() != ct;
  const int64_t n_sc = static_cast<int64_t>(op.sc.element_count());
  if (n_sc != kScalars && n_sc != L.batch * kScalars)
    return ffi::Error::InvalidArgument("fastxent_ce: the scalars operand needs 3 values");
  const bool bad_p = (A.flags & FLAG_PROBS) &&
                     (op.t.element_type() != xt || op.t.element_count() != op.x.element_count());
  if (loss->element_type() != ct || static_cast<int64_t>(loss->element_count()) != n_loss ||
      bad_w || bad_sw || bad_p ||
      (grad && (grad->element_type() != xt || grad->element_count() != op.x.element_count())))
    return ffi::Error::InvalidArgument("fastxent_ce: operand or result types do not match");
  std::vector<int64_t> am64;
  switch (xt) {
    case ffi::DataType::F32: {
      auto sp = stat_ptrs<float>(st, ct, L.batch * L.rows, L.classes);
      if (sp.has_error()) return sp.error();
      return run_all<fastxent::Inputs<float>, float, float, float>(
          A, L, op, {}, loss->typed_data<float>(), grad ? grad->typed_data<float>() : nullptr,
          [&](auto& in, auto& o, float* g, float* rl, int64_t b) {
            return with_outputs<float>(in.rows, b, sp.value(), am64, [&](const auto* ro) {
              return fastxent::cross_entropy<float>(in, o, g, rl, ro);
            });
          });
    }
    case ffi::DataType::F64: {
      auto sp = stat_ptrs<double>(st, ct, L.batch * L.rows, L.classes);
      if (sp.has_error()) return sp.error();
      return run_all<fastxent::Inputs<double>, double, double, double>(
          A, L, op, {}, loss->typed_data<double>(), grad ? grad->typed_data<double>() : nullptr,
          [&](auto& in, auto& o, double* g, double* rl, int64_t b) {
            return with_outputs<double>(in.rows, b, sp.value(), am64, [&](const auto* ro) {
              return fastxent::cross_entropy<double>(in, o, g, rl, ro);
            });
          });
    }
    case ffi::DataType::F16:
    case ffi::DataType::BF16: {
      // float32 statistics (the compute type), as the loss.
      auto sp = stat_ptrs<float>(st, ct, L.batch * L.rows, L.classes);
      if (sp.has_error()) return sp.error();
      fastxent::HalfInputs proto;
      proto.kind =
          xt == ffi::DataType::F16 ? fastxent::HalfKind::Float16 : fastxent::HalfKind::BFloat16;
      uint16_t* g = grad ? static_cast<uint16_t*>(grad->untyped_data()) : nullptr;
      return run_all<fastxent::HalfInputs, uint16_t, float, float>(
          A, L, op, proto, loss->typed_data<float>(), g,
          [&](auto& in, auto& o, uint16_t* g2, float* rl, int64_t b) {
            return with_outputs<float>(in.rows, b, sp.value(), am64, [&](const auto* ro) {
              return fastxent::cross_entropy_half(in, o, g2, rl, ro);
            });
          });
    }
    default:
      return ffi::Error::InvalidArgument("fastxent_ce: logits must be F32, F64, F16 or BF16");
  }
}

Attrs attrs(int64_t core_ndim, int64_t axis, int64_t reduction, int64_t ignore_index, int64_t flags,
            int64_t num_threads, double eps, double normalizer, double z_loss, double softcap,
            double logit_scale, double entropy_coef) {
  return Attrs{core_ndim, axis,       reduction, ignore_index, flags,       num_threads,
               eps,       normalizer, z_loss,    softcap,      logit_scale, entropy_coef};
}

ffi::Error ce_impl(ffi::AnyBuffer x, ffi::AnyBuffer t, ffi::AnyBuffer w, ffi::AnyBuffer sw,
                   ffi::AnyBuffer sc, ffi::Result<ffi::AnyBuffer> loss, int64_t core_ndim,
                   int64_t axis, int64_t reduction, int64_t ignore_index, int64_t flags,
                   int64_t num_threads, double eps, double normalizer, double z_loss,
                   double softcap, double logit_scale, double entropy_coef) {
  return dispatch(attrs(core_ndim, axis, reduction, ignore_index, flags, num_threads, eps,
                        normalizer, z_loss, softcap, logit_scale, entropy_coef),
                  Operands{x, t, w, sw, sc}, &*loss, nullptr);
}

ffi::Error ce_grad_impl(ffi::AnyBuffer x, ffi::AnyBuffer t, ffi::AnyBuffer w, ffi::AnyBuffer sw,
                        ffi::AnyBuffer sc, ffi::Result<ffi::AnyBuffer> loss,
                        ffi::Result<ffi::AnyBuffer> grad, int64_t core_ndim, int64_t axis,
                        int64_t reduction, int64_t ignore_index, int64_t flags, int64_t num_threads,
                        double eps, double normalizer, double z_loss, double softcap,
                        double logit_scale, double entropy_coef) {
  return dispatch(attrs(core_ndim, axis, reduction, ignore_index, flags, num_threads, eps,
                        normalizer, z_loss, softcap, logit_scale, entropy_coef),
                  Operands{x, t, w, sw, sc}, &*loss, &*grad);
}

// The gradient result has 0 elements for a forward pass (only the loss and the statistics).
ffi::Error ce_stats_impl(ffi::AnyBuffer x, ffi::AnyBuffer t, ffi::AnyBuffer w, ffi::AnyBuffer sw,
                         ffi::AnyBuffer sc, ffi::Result<ffi::AnyBuffer> loss,
                         ffi::Result<ffi::AnyBuffer> grad, ffi::Result<ffi::AnyBuffer> lse,
                         ffi::Result<ffi::AnyBuffer> entropy, ffi::Result<ffi::AnyBuffer> argmax,
                         ffi::Result<ffi::AnyBuffer> target_logprob, int64_t core_ndim,
                         int64_t axis, int64_t reduction, int64_t ignore_index, int64_t flags,
                         int64_t num_threads, double eps, double normalizer, double z_loss,
                         double softcap, double logit_scale, double entropy_coef) {
  const bool want_grad = grad->element_count() != 0;
  return dispatch(attrs(core_ndim, axis, reduction, ignore_index, flags, num_threads, eps,
                        normalizer, z_loss, softcap, logit_scale, entropy_coef),
                  Operands{x, t, w, sw, sc}, &*loss, want_grad ? &*grad : nullptr,
                  StatResults{&*lse, &*entropy, &*argmax, &*target_logprob});
}

template <class B>
auto with_attrs(B&& b) {
  return std::move(b)
      .template Attr<int64_t>("core_ndim")
      .template Attr<int64_t>("axis")
      .template Attr<int64_t>("reduction")
      .template Attr<int64_t>("ignore_index")
      .template Attr<int64_t>("flags")
      .template Attr<int64_t>("num_threads")
      .template Attr<double>("eps")
      .template Attr<double>("normalizer")
      .template Attr<double>("z_loss")
      .template Attr<double>("softcap")
      .template Attr<double>("logit_scale")
      .template Attr<double>("entropy_coef");
}

auto operands() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>();
}

}  // namespace
}  // namespace fastxent_ffi

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FastxentCe, fastxent_ffi::ce_impl,
    fastxent_ffi::with_attrs(fastxent_ffi::operands().Ret<ffi::AnyBuffer>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FastxentCeGrad, fastxent_ffi::ce_grad_impl,
    fastxent_ffi::with_attrs(fastxent_ffi::operands().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FastxentCeStats, fastxent_ffi::ce_stats_impl,
                              fastxent_ffi::with_attrs(fastxent_ffi::operands()
                                                           .Ret<ffi::AnyBuffer>()
                                                           .Ret<ffi::AnyBuffer>()
                                                           .Ret<ffi::AnyBuffer>()
                                                           .Ret<ffi::AnyBuffer>()
                                                           .Ret<ffi::AnyBuffer>()
                                                           .Ret<ffi::AnyBuffer>()));
