// The U-Net's convolution on CPU through oneDNN, as three XLA FFI handlers: forward, input gradient
// and weight gradient. Built on first use by medseg_jax/kernels/onednn.py (g++ against the installed
// oneDNN and the running jaxlib's FFI headers); see that module for the Python side.
//
// Layouts are the JAX side's: activations channels-last (N, *S, C), kernels (*k, C_in, C_out). They
// are described to oneDNN by strides, so no transpose is made here; the weights alone take oneDNN's
// preferred (blocked) layout through a reorder, which is small next to the convolution itself.
// Padding is given per side (the caller computes PyTorch's k // 2 and the right-hand remainder).
//
// Thread safety: XLA may run independent custom calls at once from its own threads. Primitive
// descriptors and primitives are immutable once made and oneDNN allows concurrent execution of one
// primitive; the cache that holds them is guarded by a mutex, and every call brings its own
// scratchpad (user scratchpad mode) and its own stream.

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;

enum class Pass { kForward, kBackwardData, kBackwardWeights };

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Memory that oneDNN may use with any of its vector widths.
struct AlignedBuffer {
  void* data = nullptr;
  explicit AlignedBuffer(size_t bytes) {
    if (bytes > 0) data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

// Logical oneDNN dims {N, C, *S} with channels-last strides, from a JAX shape (N, *S, C).
memory::desc activation_desc(ffi::Span<const int64_t> shape, memory::data_type type) {
  const size_t rank = shape.size();
  const size_t spatial = rank - 2;
  memory::dims dims(rank), strides(rank);
  dims[0] = shape[0];
  dims[1] = shape[rank - 1];
  for (size_t i = 0; i < spatial; ++i) dims[2 + i] = shape[1 + i];
  int64_t step = 1;
  strides[1] = step;
  step *= dims[1];
  for (size_t i = spatial; i-- > 0;) {
    strides[2 + i] = step;
    step *= dims[2 + i];
  }
  strides[0] = step;
  return memory::desc(dims, type, strides);
}

// Logical oneDNN dims {O, I, *k} with the strides of a JAX kernel (*k, I, O).
memory::desc kernel_desc(ffi::Span<const int64_t> shape, memory::data_type type) {
  const size_t rank = shape.size();
  const size_t spatial = rank - 2;
  memory::dims dims(rank), strides(rank);
  dims[0] = shape[rank - 1];
  dims[1] = shape[rank - 2];
  for (size_t i = 0; i < spatial; ++i) dims[2 + i] = shape[i];
  int64_t step = 1;
  strides[0] = step;
  step *= dims[0];
  strides[1] = step;
  step *= dims[1];
  for (size_t i = spatial; i-- > 0;) {
    strides[2 + i] = step;
    step *= dims[2 + i];
  }
  return memory::desc(dims, type, strides);
}

memory::desc any_layout(const memory::desc& desc) {
  return memory::desc(desc.get_dims(), desc.get_data_type(), memory::format_tag::any);
}

// One convolution geometry and pass: the primitive and the layouts it wants.
struct Entry {
  dnnl::primitive primitive;
  memory::desc src, weights, dst;  // as the primitive wants them (src/dst = the user's layout)
  memory::desc scratchpad;
};

std::string cache_key(Pass pass, memory::data_type type, ffi::Span<const int64_t> x,
                      ffi::Span<const int64_t> k, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> pad_l, ffi::Span<const int64_t> pad_r) {
  std::ostringstream key;
  key << static_cast<int>(pass) << '|' << static_cast<int>(type);
  for (auto span : {x, k, strides, pad_l, pad_r}) {
    key << '|';
    for (int64_t v : span) key << v << ',';
  }
  return key.str();
}

std::shared_ptr<Entry> make_entry(Pass pass, const memory::desc& x_md, const memory::desc& k_md,
                                  const memory::desc& y_md, const memory::dims& strides,
                                  const memory::dims& pad_l, const memory::dims& pad_r) {
  dnnl::engine& engine = cpu_engine();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  // The forward descriptor is also the hint every backward descriptor needs.
  dnnl::convolution_forward::primitive_desc forward(
      engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, x_md,
      any_layout(k_md), y_md, strides, pad_l, pad_r, attr);
  auto entry = std::make_shared<Entry>();
  if (pass == Pass::kForward) {
    entry->primitive = dnnl::convolution_forward(forward);
    entry->src = forward.src_desc();
    entry->weights = forward.weights_desc();
    entry->dst = forward.dst_desc();
    entry->scratchpad = forward.scratchpad_desc();
  } else if (pass == Pass::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc backward(
        engine, dnnl::algorithm::convolution_direct, x_md, any_layout(k_md), y_md, strides, pad_l,
        pad_r, forward, attr);
    entry->primitive = dnnl::convolution_backward_data(backward);
    entry->src = backward.diff_src_desc();
    entry->weights = backward.weights_desc();
    entry->dst = backward.diff_dst_desc();
    entry->scratchpad = backward.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc backward(
        engine, dnnl::algorithm::convolution_direct, x_md, any_layout(k_md), y_md, strides, pad_l,
        pad_r, forward, attr);
    entry->primitive = dnnl::convolution_backward_weights(backward);
    entry->src = backward.src_desc();
    entry->weights = backward.diff_weights_desc();
    entry->dst = backward.diff_dst_desc();
    entry->scratchpad = backward.scratchpad_desc();
  }
  return entry;
}

std::shared_ptr<Entry> cached_entry(Pass pass, const std::string& key, const memory::desc& x_md,
                                    const memory::desc& k_md, const memory::desc& y_md,
                                    const memory::dims& strides, const memory::dims& pad_l,
                                    const memory::dims& pad_r) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::shared_ptr<Entry>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  auto entry = make_entry(pass, x_md, k_md, y_md, strides, pad_l, pad_r);
  cache.emplace(key, entry);
  return entry;
}

ffi::ErrorOr<memory::data_type> data_type_of(ffi::DataType type) {
  if (type == ffi::DataType::F32) return memory::data_type::f32;
  if (type == ffi::DataType::BF16) return memory::data_type::bf16;
  return ffi::Unexpected(ffi::Error::InvalidArgument("onednn conv: only float32 and bfloat16 are supported"));
}

memory::dims to_dims(ffi::Span<const int64_t> values) { return memory::dims(values.begin(), values.end()); }

// Runs one pass. ``x``/``k``/``y`` are the user buffers of the activation in, the kernel and the
// activation out of the forward convolution (in the backward passes some are results).
ffi::Error run_pass(Pass pass, ffi::AnyBuffer::Dimensions x_shape, void* x, ffi::AnyBuffer::Dimensions k_shape,
                    void* k, ffi::AnyBuffer::Dimensions y_shape, void* y, ffi::DataType element_type,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_l,
                    ffi::Span<const int64_t> pad_r) {
  const size_t spatial = x_shape.size() - 2;
  if (spatial < 1 || spatial > 3 || k_shape.size() != x_shape.size() || y_shape.size() != x_shape.size() ||
      strides.size() != spatial || pad_l.size() != spatial || pad_r.size() != spatial) {
    return ffi::Error::InvalidArgument("onednn conv: ranks of input, kernel, output, strides and padding disagree");
  }
  auto type = data_type_of(element_type);
  if (type.has_error()) return type.error();
  try {
    const memory::desc x_md = activation_desc(x_shape, *type);
    const memory::desc k_md = kernel_desc(k_shape, *type);
    const memory::desc y_md = activation_desc(y_shape, *type);
    const std::string key = cache_key(pass, *type, x_shape, k_shape, strides, pad_l, pad_r);
    auto entry = cached_entry(pass, key, x_md, k_md, y_md, to_dims(strides), to_dims(pad_l), to_dims(pad_r));

    dnnl::engine& engine = cpu_engine();
    dnnl::stream stream(engine);
    memory x_mem(x_md, engine, x);
    memory y_mem(y_md, engine, y);
    memory k_user(k_md, engine, k);
    // The weights in the primitive's layout: a reordered copy unless it already is the user's.
    const bool reorder_weights = entry->weights != k_md;
    AlignedBuffer k_buffer(reorder_weights ? entry->weights.get_size() : 0);
    memory k_mem = reorder_weights ? memory(entry->weights, engine, k_buffer.data) : k_user;
    if (reorder_weights && pass != Pass::kBackwardWeights) {
      dnnl::reorder(k_user, k_mem).execute(stream, k_user, k_mem);
    }
    AlignedBuffer scratch(entry->scratchpad.get_size());
    memory scratch_mem(entry->scratchpad, engine, scratch.data);

    if (pass == Pass::kForward) {
      entry->primitive.execute(stream, {{DNNL_ARG_SRC, x_mem},
                                        {DNNL_ARG_WEIGHTS, k_mem},
                                        {DNNL_ARG_DST, y_mem},
                                        {DNNL_ARG_SCRATCHPAD, scratch_mem}});
    } else if (pass == Pass::kBackwardData) {
      entry->primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, x_mem},
                                        {DNNL_ARG_WEIGHTS, k_mem},
                                        {DNNL_ARG_DIFF_DST, y_mem},
                                        {DNNL_ARG_SCRATCHPAD, scratch_mem}});
    } else {
      entry->primitive.execute(stream, {{DNNL_ARG_SRC, x_mem},
                                        {DNNL_ARG_DIFF_WEIGHTS, k_mem},
                                        {DNNL_ARG_DIFF_DST, y_mem},
                                        {DNNL_ARG_SCRATCHPAD, scratch_mem}});
      if (reorder_weights) dnnl::reorder(k_mem, k_user).execute(stream, k_mem, k_user);
    }
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(std::string("onednn conv: ") + error.what());
  } catch (const std::exception& error) {  // e.g. std::bad_alloc: an error for XLA, never a crash
    return ffi::Error::Internal(std::string("onednn conv: ") + error.what());
  }
  return ffi::Error::Success();
}

ffi::Error forward(ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_l,
                   ffi::Span<const int64_t> pad_r) {
  return run_pass(Pass::kForward, x.dimensions(), x.untyped_data(), k.dimensions(), k.untyped_data(),
                  y->dimensions(), y->untyped_data(), x.element_type(), strides, pad_l, pad_r);
}

ffi::Error backward_data(ffi::AnyBuffer dy, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> dx,
                         ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_l,
                         ffi::Span<const int64_t> pad_r) {
  return run_pass(Pass::kBackwardData, dx->dimensions(), dx->untyped_data(), k.dimensions(), k.untyped_data(),
                  dy.dimensions(), dy.untyped_data(), dy.element_type(), strides, pad_l, pad_r);
}

ffi::Error backward_weights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dk,
                            ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_l,
                            ffi::Span<const int64_t> pad_r) {
  return run_pass(Pass::kBackwardWeights, x.dimensions(), x.untyped_data(), dk->dimensions(), dk->untyped_data(),
                  dy.dimensions(), dy.untyped_data(), x.element_type(), strides, pad_l, pad_r);
}

}  // namespace

#define MEDSEG_CONV_BINDING(first, second, result)            \
  ffi::Ffi::Bind()                                            \
      .Arg<ffi::AnyBuffer>()                                  \
      .Arg<ffi::AnyBuffer>()                                  \
      .Ret<ffi::AnyBuffer>()                                  \
      .Attr<ffi::Span<const int64_t>>("strides")              \
      .Attr<ffi::Span<const int64_t>>("padding_low")          \
      .Attr<ffi::Span<const int64_t>>("padding_high")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedsegOnednnConvForward, forward, MEDSEG_CONV_BINDING(x, k, y));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MedsegOnednnConvBackwardData, backward_data, MEDSEG_CONV_BINDING(dy, k, dx));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MedsegOnednnConvBackwardWeights, backward_weights, MEDSEG_CONV_BINDING(x, dy, dk));

extern "C" const char* MedsegOnednnVersion() {
  static std::string version = [] {
    const dnnl_version_t* v = dnnl_version();
    std::ostringstream text;
    text << v->major << '.' << v->minor << '.' << v->patch << " (" << v->hash << ")";
    return text.str();
  }();
  return version.c_str();
}
