// Fused operators of gluon-qat's quantizers (MXNet custom-operator library).
//
//   qat_quantize_act(x, scale; low, high) -> codes
//       codes = clamp(trunc(x*scale + copysign(0.5, x*scale)), low, high)   (ncnn float2int8)
//       d codes / d x = scale where low <= x*scale <= high, else 0   (straight-through)
//       d codes / d scale = x there, else 0, when scale_grad=1 (learned ranges, LSQ);
//       0 otherwise (the range is not a trained quantity)
//   qat_absmax(x) -> (1,) max |x|                                     (no gradient)
//   qat_dequantize(acc, multiplier, bias; fused=1) -> fma(acc, multiplier[c], bias[c])  (c = axis 1)
//       one rounding, as ncnn's int8 layers compute acc * scale_in + bias with FMA;
//       fused=0: acc * multiplier[c] rounded, then + bias[c] (ncnn's generic depthwise loop)
//
//   qat_weight_scale(w, factor; high, min_threshold, max_threshold) -> s (O,)   (no gradient)
//       per output channel c (axis 0): high / safe(max|w[c]| * factor[c]), as
//       ops.scale_from_threshold(ops.weight_threshold(...) * factor) ('channel', one group)
//   qat_quantize_weight(w, s; low, high) -> codes: y = w * s[c],
//       clip(trunc(y + 0.5 * sign(y)), low, high) + (y - y), ops.quantize op for op;
//       d codes / d w = s[c]
//   qat_tracked_scale(ema[, fallback]; high, min_threshold, max_threshold) -> (1,)
//       high / clip(nan_to_min(ema[0] / ema[1] if ema[1] > 0 else fallback))  (no gradient)
//       = ops.scale_from_threshold(ranges.ema_value(...)) in float32, op for op
//   qat_range_stats(range, anchor) -> (1, 2) [range + 0, 1]; qat_zero_token(x) -> sum(x) * 0:
//       the two ends of ranges.ema_update's BatchNorm, zero gradients
//
// Each replaces a chain of MXNet ops (MXNet 1.9 has no CPU fusion, and every op costs a
// dispatch): one pass over the tensor each way, the same float32 arithmetic.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include "mxnet/lib_api.h"

using namespace mxnet::ext;

static float attr_float(const std::unordered_map<std::string, std::string>& attrs,
                        const char* key) {
  auto it = attrs.find(key);
  return it == attrs.end() ? 0.f : std::strtof(it->second.c_str(), nullptr);
}

static MXReturnValue quantize_forward(const std::unordered_map<std::string, std::string>& attrs,
                                      std::vector<MXTensor>* inputs,
                                      std::vector<MXTensor>* outputs, const OpResource& res) {
  const float* x = inputs->at(0).data<float>();
  const float scale = inputs->at(1).data<float>()[0];
  float* q = outputs->at(0).data<float>();
  const float low = attr_float(attrs, "low"), high = attr_float(attrs, "high");
  const int64_t n = inputs->at(0).size();
  // trunc as an int conversion of t clamped into [low - 1, high + 1], where it is exact
  // (std::trunc does not vectorize); copysign keeps trunc's -0, NaN passes through as before
  const float lo1 = low - 1.f, hi1 = high + 1.f;
#pragma omp parallel for simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] * scale;
    const float t = v + std::copysign(0.5f, v);
    const float c = t >= lo1 ? (t <= hi1 ? t : hi1) : lo1;  // NaN -> lo1: no UB below
    float r = std::copysign(static_cast<float>(static_cast<int32_t>(c)), t);
    r = r < low ? low : (r > high ? high : r);
    q[i] = t != t ? t : r;
  }
  return MX_SUCCESS;
}

// inputs: out_grad, x, scale, codes ; outputs: grad_x, grad_scale
static MXReturnValue quantize_backward(const std::unordered_map<std::string, std::string>& attrs,
                                       std::vector<MXTensor>* inputs,
                                       std::vector<MXTensor>* outputs, const OpResource& res) {
  const float* grad = inputs->at(0).data<float>();
  const float* x = inputs->at(1).data<float>();
  const float scale = inputs->at(2).data<float>()[0];
  float* grad_x = outputs->at(0).data<float>();
  const float low = attr_float(attrs, "low"), high = attr_float(attrs, "high");
  const bool scale_grad = attr_float(attrs, "scale_grad") != 0.f;
  const int64_t n = inputs->at(1).size();
  if (!scale_grad) {  // no reduction in the loop: it vectorizes
#pragma omp parallel for simd
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i] * scale;
      grad_x[i] = v >= low && v <= high ? grad[i] * scale : 0.f;
    }
    outputs->at(1).data<float>()[0] = 0.f;
    return MX_SUCCESS;
  }
  double sum = 0;  // double: a sum over the whole tensor
#pragma omp parallel for reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] * scale;
    const bool inside = v >= low && v <= high;
    grad_x[i] = inside ? grad[i] * scale : 0.f;
    if (scale_grad && inside) sum += static_cast<double>(grad[i]) * x[i];
  }
  outputs->at(1).data<float>()[0] = static_cast<float>(sum);
  return MX_SUCCESS;
}

static MXReturnValue quantize_attrs(const std::unordered_map<std::string, std::string>& attrs,
                                    int* num_in, int* num_out) {
  *num_in = 2;
  *num_out = 1;
  return MX_SUCCESS;
}

static MXReturnValue float_types(const std::unordered_map<std::string, std::string>& attrs,
                                 std::vector<int>* in_types, std::vector<int>* out_types) {
  for (int t : *in_types)
    if (t != kFloat32) return MX_FAIL;
  for (auto& t : *out_types) t = kFloat32;
  return MX_SUCCESS;
}

static MXReturnValue quantize_shape(const std::unordered_map<std::string, std::string>& attrs,
                                    std::vector<std::vector<unsigned int>>* in_shapes,
                                    std::vector<std::vector<unsigned int>>* out_shapes) {
  out_shapes->at(0) = in_shapes->at(0);
  return MX_SUCCESS;
}

REGISTER_OP(qat_quantize_act)
.setParseAttrs(quantize_attrs)
.setInferType(float_types)
.setInferShape(quantize_shape)
.setForward(quantize_forward, "cpu")
.setBackward(quantize_backward, "cpu");

static MXReturnValue absmax_forward(const std::unordered_map<std::string, std::string>& attrs,
                                    std::vector<MXTensor>* inputs,
                                    std::vector<MXTensor>* outputs, const OpResource& res) {
  // max of the bits of |x|: for non-NaN floats >= 0 the integer order is the float order,
  // and every NaN lies above +inf (0x7f800000); an integer max vectorizes, a float one not
  const uint32_t* u = reinterpret_cast<const uint32_t*>(inputs->at(0).data<float>());
  const int64_t n = inputs->at(0).size();
  uint32_t m = 0;
#pragma omp parallel for simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t a = u[i] & 0x7fffffffu;
    m = a > m ? a : m;
  }
  float value;
  std::memcpy(&value, &m, sizeof(value));
  outputs->at(0).data<float>()[0] = m > 0x7f800000u ? NAN : value;
  return MX_SUCCESS;
}

static MXReturnValue absmax_attrs(const std::unordered_map<std::string, std::string>& attrs,
                                  int* num_in, int* num_out) {
  *num_in = 1;
  *num_out = 1;
  return MX_SUCCESS;
}

static MXReturnValue absmax_shape(const std::unordered_map<std::string, std::string>& attrs,
                                  std::vector<std::vector<unsigned int>>* in_shapes,
                                  std::vector<std::vector<unsigned int>>* out_shapes) {
  out_shapes->at(0) = std::vector<unsigned int>{1};
  return MX_SUCCESS;
}

REGISTER_OP(qat_absmax)
.setParseAttrs(absmax_attrs)
.setInferType(float_types)
.setInferShape(absmax_shape)
.setForward(absmax_forward, "cpu");

// Size of the channel axis (1) and of everything after it, for a tensor of rank >= 2.
static void channel_layout(const MXTensor& t, int64_t* outer, int64_t* channels,
                           int64_t* inner) {
  *outer = t.shape[0];
  *channels = t.shape.size() > 1 ? t.shape[1] : 1;
  *inner = 1;
  for (size_t d = 2; d < t.shape.size(); ++d) *inner *= t.shape[d];
}

static MXReturnValue dequantize_forward(const std::unordered_map<std::string, std::string>& attrs,
                                        std::vector<MXTensor>* inputs,
                                        std::vector<MXTensor>* outputs, const OpResource& res) {
  const float* acc = inputs->at(0).data<float>();
  const float* m = inputs->at(1).data<float>();
  const float* b = inputs->at(2).data<float>();
  float* y = outputs->at(0).data<float>();
  int64_t outer, channels, inner;
  channel_layout(inputs->at(0), &outer, &channels, &inner);
  const auto it = attrs.find("fused");
  const bool fused = it == attrs.end() || it->second != "0";
#pragma omp parallel for collapse(2)
  for (int64_t n = 0; n < outer; ++n)
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t base = (n * channels + c) * inner;
      for (int64_t i = 0; i < inner; ++i)
        y[base + i] = fused ? std::fma(acc[base + i], m[c], b[c]) : acc[base + i] * m[c] + b[c];
    }
  return MX_SUCCESS;
}

// inputs: out_grad, acc, multiplier, bias, y ; outputs: grad_acc, grad_multiplier, grad_bias
static MXReturnValue dequantize_backward(const std::unordered_map<std::string, std::string>& attrs,
                                         std::vector<MXTensor>* inputs,
                                         std::vector<MXTensor>* outputs, const OpResource& res) {
  const float* grad = inputs->at(0).data<float>();
  const float* acc = inputs->at(1).data<float>();
  const float* m = inputs->at(2).data<float>();
  float* grad_acc = outputs->at(0).data<float>();
  float* grad_m = outputs->at(1).data<float>();
  float* grad_b = outputs->at(2).data<float>();
  int64_t outer, channels, inner;
  channel_layout(inputs->at(1), &outer, &channels, &inner);
#pragma omp parallel for
  for (int64_t c = 0; c < channels; ++c) {
    double sum_m = 0, sum_b = 0;  // double: sums over many elements
    for (int64_t n = 0; n < outer; ++n) {
      const int64_t base = (n * channels + c) * inner;
      for (int64_t i = 0; i < inner; ++i) {
        const float g = grad[base + i];
        grad_acc[base + i] = g * m[c];
        sum_m += static_cast<double>(g) * acc[base + i];
        sum_b += g;
      }
    }
    grad_m[c] = static_cast<float>(sum_m);
    grad_b[c] = static_cast<float>(sum_b);
  }
  return MX_SUCCESS;
}

static MXReturnValue dequantize_attrs(const std::unordered_map<std::string, std::string>& attrs,
                                      int* num_in, int* num_out) {
  *num_in = 3;
  *num_out = 1;
  return MX_SUCCESS;
}

static MXReturnValue dequantize_shape(const std::unordered_map<std::string, std::string>& attrs,
                                      std::vector<std::vector<unsigned int>>* in_shapes,
                                      std::vector<std::vector<unsigned int>>* out_shapes) {
  const auto& x = in_shapes->at(0);
  const unsigned int channels = x.size() > 1 ? x[1] : 1;
  if (in_shapes->at(1).size() != 1 || in_shapes->at(1)[0] != channels ||
      in_shapes->at(2).size() != 1 || in_shapes->at(2)[0] != channels)
    return MX_FAIL;
  out_shapes->at(0) = x;
  return MX_SUCCESS;
}

REGISTER_OP(qat_dequantize)
.setParseAttrs(dequantize_attrs)
.setInferType(float_types)
.setInferShape(dequantize_shape)
.setForward(dequantize_forward, "cpu")
.setBackward(dequantize_backward, "cpu");

// ----- weight quantizer: the ~20 MXNet ops of ops.weight_threshold + ops.quantize as two ------
// (one output each: a two-output custom op made the cached graph run dynamically, slower)

static float safe_threshold(float t, float min_t, float max_t) {
  if (t != t) t = min_t;  // ops.safe_threshold: NaN -> MIN_THRESHOLD, then MXNet's clip
  return t > max_t ? max_t : (t < min_t ? min_t : t);
}

static void rows(const MXTensor& t, int64_t* channels, int64_t* k) {
  *channels = t.shape[0];
  *k = *channels ? t.size() / *channels : 0;
}

static MXReturnValue weight_scale_forward(
    const std::unordered_map<std::string, std::string>& attrs, std::vector<MXTensor>* inputs,
    std::vector<MXTensor>* outputs, const OpResource& res) {
  const float* w = inputs->at(0).data<float>();
  const float* factor = inputs->at(1).data<float>();
  float* s = outputs->at(0).data<float>();
  const float high = attr_float(attrs, "high");
  const float min_t = attr_float(attrs, "min_threshold"), max_t = attr_float(attrs, "max_threshold");
  int64_t channels, k;
  rows(inputs->at(0), &channels, &k);
#pragma omp parallel for
  for (int64_t c = 0; c < channels; ++c) {
    const float* row = w + c * k;
    float m = -INFINITY;  // MXNet's max reducer: a NaN sticks
    for (int64_t i = 0; i < k; ++i) {
      const float a = std::fabs(row[i]);
      if (m == m && !(m >= a)) m = a;
    }
    s[c] = high / safe_threshold(m * factor[c], min_t, max_t);
  }
  return MX_SUCCESS;
}

static MXReturnValue two_inputs(const std::unordered_map<std::string, std::string>& attrs,
                                int* num_in, int* num_out) {
  *num_in = 2;
  *num_out = 1;
  return MX_SUCCESS;
}

static MXReturnValue weight_scale_shape(
    const std::unordered_map<std::string, std::string>& attrs,
    std::vector<std::vector<unsigned int>>* in_shapes,
    std::vector<std::vector<unsigned int>>* out_shapes) {
  const auto& w = in_shapes->at(0);
  if (w.empty() || in_shapes->at(1).size() != 1 || in_shapes->at(1)[0] != w[0]) return MX_FAIL;
  out_shapes->at(0) = std::vector<unsigned int>{w[0]};
  return MX_SUCCESS;
}

REGISTER_OP(qat_weight_scale)
.setParseAttrs(two_inputs)
.setInferType(float_types)
.setInferShape(weight_scale_shape)
.setForward(weight_scale_forward, "cpu");

static MXReturnValue weight_forward(const std::unordered_map<std::string, std::string>& attrs,
                                    std::vector<MXTensor>* inputs,
                                    std::vector<MXTensor>* outputs, const OpResource& res) {
  const float* w = inputs->at(0).data<float>();
  const float* s = inputs->at(1).data<float>();
  float* out = outputs->at(0).data<float>();
  const float low = attr_float(attrs, "low"), high = attr_float(attrs, "high");
  int64_t channels, k;
  rows(inputs->at(0), &channels, &k);
#pragma omp parallel for
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t i = c * k; i < (c + 1) * k; ++i) {
      const float y = w[i] * s[c];
      const float sign = y < 0.f ? -1.f : (y > 0.f ? 1.f : 0.f);  // mshadow's sign
      const float r = std::trunc(y + sign * 0.5f);
      const float q = r > high ? high : (r < low ? low : r);  // MXNet's clip
      out[i] = q + (y - y);
    }
  return MX_SUCCESS;
}

// inputs: grad_codes, w, s, codes ; outputs: grad_w, grad_s (0: scales are constants)
static MXReturnValue weight_backward(const std::unordered_map<std::string, std::string>& attrs,
                                     std::vector<MXTensor>* inputs,
                                     std::vector<MXTensor>* outputs, const OpResource& res) {
  const float* grad = inputs->at(0).data<float>();
  const float* s = inputs->at(2).data<float>();
  float* grad_w = outputs->at(0).data<float>();
  int64_t channels, k;
  rows(inputs->at(1), &channels, &k);
#pragma omp parallel for
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t i = c * k; i < (c + 1) * k; ++i) grad_w[i] = grad[i] * s[c];
  std::memset(outputs->at(1).data<float>(), 0, outputs->at(1).size() * sizeof(float));
  return MX_SUCCESS;
}

static MXReturnValue weight_shape(const std::unordered_map<std::string, std::string>& attrs,
                                  std::vector<std::vector<unsigned int>>* in_shapes,
                                  std::vector<std::vector<unsigned int>>* out_shapes) {
  const auto& w = in_shapes->at(0);
  if (w.empty() || in_shapes->at(1).size() != 1 || in_shapes->at(1)[0] != w[0]) return MX_FAIL;
  out_shapes->at(0) = w;
  return MX_SUCCESS;
}

REGISTER_OP(qat_quantize_weight)
.setParseAttrs(two_inputs)
.setInferType(float_types)
.setInferShape(weight_shape)
.setForward(weight_forward, "cpu")
.setBackward(weight_backward, "cpu");

// ----- range tracker: the chain of (1,)-shaped ops each layer ran, as two operators -----------

static MXReturnValue tracked_scale_forward(
    const std::unordered_map<std::string, std::string>& attrs, std::vector<MXTensor>* inputs,
    std::vector<MXTensor>* outputs, const OpResource& res) {
  const float* ema = inputs->at(0).data<float>();
  const float fallback = inputs->size() > 1 ? inputs->at(1).data<float>()[0] : 0.f;
  const float high = attr_float(attrs, "high");
  const float min_t = attr_float(attrs, "min_threshold"), max_t = attr_float(attrs, "max_threshold");
  const float m_x = ema[0], m_1 = ema[1];
  const bool updated = m_1 > 0.f;  // ranges.ema_value
  float t = updated ? m_x / m_1 : fallback;
  if (t != t) t = min_t;  // ops.safe_threshold: NaN -> MIN_THRESHOLD, then MXNet's clip
  t = t > max_t ? max_t : (t < min_t ? min_t : t);
  outputs->at(0).data<float>()[0] = high / t;  // ops.scale_from_threshold (_rdiv_scalar)
  return MX_SUCCESS;
}

static MXReturnValue tracked_scale_attrs(
    const std::unordered_map<std::string, std::string>& attrs, int* num_in, int* num_out) {
  const auto it = attrs.find("fallback");
  *num_in = it != attrs.end() && it->second == "0" ? 1 : 2;
  *num_out = 1;
  return MX_SUCCESS;
}

static MXReturnValue scalar_shape(const std::unordered_map<std::string, std::string>& attrs,
                                  std::vector<std::vector<unsigned int>>* in_shapes,
                                  std::vector<std::vector<unsigned int>>* out_shapes) {
  out_shapes->at(0) = std::vector<unsigned int>{1};
  return MX_SUCCESS;
}

// ema is declared written (it is only read): MXNet's BatchNorm updates it in its backward
// pass without declaring the write, so only a writer here is ordered after that update
static MXReturnValue tracked_scale_mutate(
    const std::unordered_map<std::string, std::string>& attrs, std::vector<int>* input_indices) {
  input_indices->push_back(0);
  return MX_SUCCESS;
}

REGISTER_OP(qat_tracked_scale)
.setParseAttrs(tracked_scale_attrs)
.setInferType(float_types)
.setInferShape(scalar_shape)
.setMutateInputs(tracked_scale_mutate)
.setForward(tracked_scale_forward, "cpu");

// ranges.ema_update's input of the tracker's BatchNorm: [range + 0, 1] as (1, 2); ``anchor``
// only ties it to a gradient path (so MXNet runs the BatchNorm's backward, which updates).
static MXReturnValue range_stats_forward(
    const std::unordered_map<std::string, std::string>& attrs, std::vector<MXTensor>* inputs,
    std::vector<MXTensor>* outputs, const OpResource& res) {
  float* stats = outputs->at(0).data<float>();
  stats[0] = inputs->at(0).data<float>()[0] + 0.f;
  stats[1] = 1.f;
  return MX_SUCCESS;
}

// zero gradients for every input (the values only feed a running average)
static MXReturnValue zero_backward(const std::unordered_map<std::string, std::string>& attrs,
                                   std::vector<MXTensor>* inputs,
                                   std::vector<MXTensor>* outputs, const OpResource& res) {
  for (auto& out : *outputs) std::memset(out.data<float>(), 0, out.size() * sizeof(float));
  return MX_SUCCESS;
}

static MXReturnValue range_stats_shape(
    const std::unordered_map<std::string, std::string>& attrs,
    std::vector<std::vector<unsigned int>>* in_shapes,
    std::vector<std::vector<unsigned int>>* out_shapes) {
  out_shapes->at(0) = std::vector<unsigned int>{1, 2};
  return MX_SUCCESS;
}

REGISTER_OP(qat_range_stats)
.setParseAttrs(two_inputs)
.setInferType(float_types)
.setInferShape(range_stats_shape)
.setForward(range_stats_forward, "cpu")
.setBackward(zero_backward, "cpu");

// (1,) sum(x) * 0: a zero (NaN for a non-finite x) to add on a gradient path
static MXReturnValue zero_token_forward(
    const std::unordered_map<std::string, std::string>& attrs, std::vector<MXTensor>* inputs,
    std::vector<MXTensor>* outputs, const OpResource& res) {
  const float* x = inputs->at(0).data<float>();
  float sum = 0.f;
  for (int64_t i = 0; i < inputs->at(0).size(); ++i) sum += x[i];
  outputs->at(0).data<float>()[0] = sum * 0.f;
  return MX_SUCCESS;
}

static MXReturnValue one_input(const std::unordered_map<std::string, std::string>& attrs,
                               int* num_in, int* num_out) {
  *num_in = 1;
  *num_out = 1;
  return MX_SUCCESS;
}

REGISTER_OP(qat_zero_token)
.setParseAttrs(one_input)
.setInferType(float_types)
.setInferShape(scalar_shape)
.setForward(zero_token_forward, "cpu")
.setBackward(zero_backward, "cpu");

MXReturnValue initialize(int version) {
  return version >= 10900 ? MX_SUCCESS : MX_FAIL;
}
