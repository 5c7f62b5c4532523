// Fused operators for the activation path of gluon-qat (MXNet custom-operator library).
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
// One pass over the tensor each way instead of the six elementwise MXNet ops they replace.
#include <cmath>
#include <cstdlib>
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
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] * scale;
    float r = std::trunc(v + std::copysign(0.5f, v));
    q[i] = r < low ? low : (r > high ? high : r);
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
  const float* x = inputs->at(0).data<float>();
  const int64_t n = inputs->at(0).size();
  float m = 0.f;
  bool nan = false;
#pragma omp parallel for reduction(max : m) reduction(|| : nan)
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    nan = nan || (a != a);
    m = a > m ? a : m;
  }
  outputs->at(0).data<float>()[0] = nan ? NAN : m;
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

MXReturnValue initialize(int version) {
  return version >= 10900 ? MX_SUCCESS : MX_FAIL;
}
