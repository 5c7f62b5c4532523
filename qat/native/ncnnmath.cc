// ncnn's own fp32 arithmetic for the layers it runs in float between int8 layers, so that the
// simulation hands the next int8 layer the very values ncnn does (docs/ncnn-int8-contract.md
// §3.7). Measured against the ncnn runtime (x86, AVX-512 dispatch, packing off):
//
//   exp(x)        ncnn's cephes polynomial: clamp to +-88.376, n = floor(x*log2e + 0.5) (FMA),
//                 r = x - n*C1 - n*C2 (FMA), a degree-5 polynomial by FMA, times 2^n
//   a / b         ncnn is built with -ffast-math: GCC writes a vector division as a
//                 reciprocal estimate (VRCP14PS) and one Newton step,
//                 r = (x0 + x0) - x0 * (x0 * b); a * r
//   sigmoid(x)    1 / (1 + exp(-x))        tanh(x) = 2 * sigmoid(2x) - 1 (one fmsub)
//   sigmoid_libm  1.f / (1.f + expf(-x)) with libm's expf: the sigmoid an int8 InnerProduct
//                 fuses (its unpacked output loop is scalar C)
//   swish(x)      x / (1 + exp(-x))        elu(x)  = x < 0 ? alpha * (exp(x) - 1) : x
//   hardsigmoid   clamp(fma(x, alpha, beta), 0, 1)      hardswish = x * hardsigmoid(x)
//
//   qat_ncnn_act(x; act, alpha, beta) -> y        one of the above, elementwise
//   qat_ncnn_global_avgpool(x) -> (N, C, 1, 1)    ncnn's unpacked global average: the plane
//       summed in four interleaved float32 lanes (element i into lane i % 4, the last
//       size % 4 elements added one by one after the lanes are combined as
//       (l0 + l2) + (l1 + l3)), times float32(1 / size)
//   qat_ncnn_bilinear(x; height, width, align_corners) -> ncnn's unpacked bilinear Interp
//
// The ncnn runtime picks its code path by CPU; the exact forms are its AVX-512 ones, used when
// this library is built for an AVX-512 CPU. Elsewhere the same formulas run with a correctly
// rounded division (within an ulp of ncnn's). No gradients: these run only in verification.
#include <cmath>
#include <cstring>
#include <vector>
#include <string>
#include "mxnet/lib_api.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

using namespace mxnet::ext;

namespace {

enum Act { kSigmoid, kTanh, kSwish, kElu, kHardSigmoid, kHardSwish, kSigmoidLibm };

bool parse_act(const std::string& name, Act* act) {
  static const char* names[] = {"sigmoid", "tanh", "swish", "elu", "hardsigmoid", "hardswish",
                                "sigmoid_libm"};
  for (int k = 0; k < 7; ++k)
    if (name == names[k]) { *act = static_cast<Act>(k); return true; }
  return false;
}

float attr(const std::unordered_map<std::string, std::string>& attrs, const char* key,
           float fallback) {
  auto it = attrs.find(key);
  return it == attrs.end() ? fallback : std::strtof(it->second.c_str(), nullptr);
}

// ---- scalar forms (one element at a time; the same operations as ncnn's vector code) ----
float exp_cephes(float x) {
  x = std::fmin(x, 88.3762626647949f);
  x = std::fmax(x, -88.3762626647949f);
  float fx = std::fma(x, 1.44269504088896341f, 0.5f);
  fx = std::floor(fx);
  x = std::fma(-fx, 0.693359375f, x);
  x = std::fma(-fx, -2.12194440e-4f, x);
  const float z = x * x;
  float y = 1.9875691500E-4f;
  y = std::fma(y, x, 1.3981999507E-3f);
  y = std::fma(y, x, 8.3334519073E-3f);
  y = std::fma(y, x, 4.1665795894E-2f);
  y = std::fma(y, x, 1.6666665459E-1f);
  y = std::fma(y, x, 5.0000001201E-1f);
  y = std::fma(y, z, x) + 1.f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return y * pow2n;
}

float act_scalar(Act act, float x, float alpha, float beta) {
  switch (act) {
    case kSigmoid: return 1.f / (1.f + exp_cephes(-x));
    case kTanh: return std::fma(1.f / (1.f + exp_cephes(-2.f * x)), 2.f, -1.f);
    case kSwish: return x / (1.f + exp_cephes(-x));
    case kElu: return x < 0.f ? alpha * (exp_cephes(x) - 1.f) : x;
    case kHardSigmoid: return std::fmin(std::fmax(std::fma(x, alpha, beta), 0.f), 1.f);
    case kHardSwish: return std::fmin(std::fmax(std::fma(x, alpha, beta), 0.f), 1.f) * x;
    case kSigmoidLibm: return 1.f / (1.f + std::exp(-x));
  }
  return x;
}

#if defined(__AVX512F__)
__m512 exp16(__m512 x) {
  x = _mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f));
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f));
  __m512 fx = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
  fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, z, x), _mm512_set1_ps(1.f));
  __m512i n = _mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127));
  return _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(n, 23)));
}

// a / b as GCC's -ffast-math code computes it: reciprocal estimate, one Newton step.
__m512 div16(__m512 a, __m512 b) {
  const __m512 x0 = _mm512_rcp14_ps(b);
  const __m512 r = _mm512_sub_ps(_mm512_add_ps(x0, x0), _mm512_mul_ps(x0, _mm512_mul_ps(x0, b)));
  return _mm512_mul_ps(a, r);
}

__m512 act16(Act act, __m512 x, float alpha, float beta) {
  const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  switch (act) {
    case kSigmoid:
      return div16(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(zero, x))));
    case kTanh: {
      const __m512 two = _mm512_set1_ps(2.f);
      const __m512 s = div16(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(zero,
                                                                          _mm512_mul_ps(x, two)))));
      return _mm512_fmsub_ps(s, two, one);
    }
    case kSwish:
      return div16(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(zero, x))));
    case kElu: {
      const __m512 neg = _mm512_sub_ps(exp16(_mm512_min_ps(zero, x)), one);
      return _mm512_add_ps(_mm512_max_ps(zero, x), _mm512_mul_ps(_mm512_set1_ps(alpha), neg));
    }
    case kHardSigmoid:
    case kHardSwish: {
      __m512 h = _mm512_fmadd_ps(x, _mm512_set1_ps(alpha), _mm512_set1_ps(beta));
      h = _mm512_min_ps(_mm512_max_ps(h, zero), one);
      return act == kHardSwish ? _mm512_mul_ps(h, x) : h;
    }
  }
  return x;
}
#endif

#if defined(__AVX512F__)
// a / b by the legacy reciprocal estimate (RCPPS) and one Newton step: GCC's fast-math
// division in 256- and 128-bit vectors (the 512-bit one uses VRCP14PS).
float div_rcp(float a, float b) {
  const float x0 = _mm_cvtss_f32(_mm_rcp_ss(_mm_set_ss(b)));
  return a * ((x0 + x0) - x0 * (x0 * b));
}
#endif

// One element of the narrower paths of ncnn's loops: ``width`` 8 or 4 (the AVX and SSE
// vectors after the AVX-512 loop), 1 (the scalar tail, libm and plain C).
float act_narrow(Act act, float x, float alpha, float beta, int width) {
  switch (act) {
    case kSwish:
#if defined(__AVX512F__)
      if (width > 1) return div_rcp(x, 1.f + exp_cephes(-x));
#endif
      return x / (1.f + std::exp(-x));
    case kElu:
      if (width == 1) return x < 0.f ? alpha * (std::exp(x) - 1.f) : x;
      return act_scalar(act, x, alpha, beta);
    case kHardSigmoid:
    case kHardSwish: {
      const float lower = -beta / alpha, upper = 1.f / alpha + lower;
      if (width > 1) return act_scalar(act, x, alpha, beta);
      // the scalar tail tests the input against the thresholds instead of clamping
      if (x < lower) return 0.f;
      if (x > upper) return act == kHardSwish ? x : 1.f;
      return act == kHardSwish ? x * std::fma(x, alpha, beta) : std::fma(x, alpha, beta);
    }
    default:
      return act_scalar(act, x, alpha, beta);
  }
}

// One ncnn channel plane of ``size`` elements, as ncnn's x86 activation layers walk it.
void act_plane(Act act, const float* x, float* y, int64_t size, float alpha, float beta) {
  int64_t i = 0;
  if (act == kSigmoidLibm) {
    for (; i < size; ++i) y[i] = act_scalar(act, x[i], alpha, beta);
    return;
  }
#if defined(__AVX512F__)
  for (; i + 16 <= size; i += 16)
    _mm512_storeu_ps(y + i, act16(act, _mm512_loadu_ps(x + i), alpha, beta));
  if ((act == kSigmoid || act == kTanh) && i < size) {  // a masked AVX-512 tail
    const __mmask16 mask = static_cast<__mmask16>((1u << (size - i)) - 1);
    _mm512_mask_storeu_ps(y + i, mask, act16(act, _mm512_maskz_loadu_ps(mask, x + i), alpha,
                                             beta));
    return;
  }
  for (const int width : {8, 4})
    for (; i + width <= size; i += width)
      for (int k = 0; k < width; ++k) y[i + k] = act_narrow(act, x[i + k], alpha, beta, width);
#endif
  for (; i < size; ++i) y[i] = act_narrow(act, x[i], alpha, beta, 1);
}

// Elements per ncnn channel plane of a batched tensor: a per-sample rank of 3 or 4 is ncnn's
// (c, [d,] h, w) with c = axis 1; ranks 1 and 2 are one plane.
int64_t plane_size(const MXTensor& t) {
  int64_t size = 1;
  const size_t first = t.shape.size() >= 4 ? 2 : 1;
  for (size_t d = first; d < t.shape.size(); ++d) size *= t.shape[d];
  return size;
}

MXReturnValue act_forward(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                          const OpResource& res) {
  Act act;
  if (!parse_act(attrs.at("act"), &act)) return MX_FAIL;
  const float alpha = attr(attrs, "alpha", 1.f), beta = attr(attrs, "beta", 0.f);
  MXTensor& in = inputs->at(0);
  const float* x = in.data<float>();
  float* y = outputs->at(0).data<float>();
  const int64_t size = plane_size(in), planes = in.size() / (size ? size : 1);
#pragma omp parallel for
  for (int64_t p = 0; p < planes; ++p) act_plane(act, x + p * size, y + p * size, size, alpha, beta);
  return MX_SUCCESS;
}

MXReturnValue act_attrs(const std::unordered_map<std::string, std::string>& attrs, int* num_in,
                        int* num_out) {
  Act act;
  auto it = attrs.find("act");
  if (it == attrs.end() || !parse_act(it->second, &act)) return MX_FAIL;
  *num_in = 1;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue float_type(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<int>* in_types, std::vector<int>* out_types) {
  if (in_types->at(0) != kFloat32) return MX_FAIL;
  out_types->at(0) = kFloat32;
  return MX_SUCCESS;
}

MXReturnValue same_shape(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<std::vector<unsigned int>>* in_shapes,
                         std::vector<std::vector<unsigned int>>* out_shapes) {
  out_shapes->at(0) = in_shapes->at(0);
  return MX_SUCCESS;
}

MXReturnValue pool_forward(const std::unordered_map<std::string, std::string>& attrs,
                           std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                           const OpResource& res) {
  MXTensor& in = inputs->at(0);
  const float* x = in.data<float>();
  float* y = outputs->at(0).data<float>();
  int64_t size = 1;
  for (size_t d = 2; d < in.shape.size(); ++d) size *= in.shape[d];
  const int64_t planes = in.shape[0] * in.shape[1];
  const float inv = 1.f / static_cast<float>(size);
#pragma omp parallel for
  for (int64_t p = 0; p < planes; ++p) {
    const float* v = x + p * size;
    float lane[4] = {0.f, 0.f, 0.f, 0.f};
    int64_t i = 0;
    for (; i + 4 <= size; i += 4)
      for (int k = 0; k < 4; ++k) lane[k] += v[i + k];
    float sum = (lane[0] + lane[2]) + (lane[1] + lane[3]);
    for (; i < size; ++i) sum += v[i];
    y[p] = sum * inv;
  }
  return MX_SUCCESS;
}

MXReturnValue one_input(const std::unordered_map<std::string, std::string>& attrs, int* num_in,
                         int* num_out) {
  *num_in = 1;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue pool_shape(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<std::vector<unsigned int>>* in_shapes,
                         std::vector<std::vector<unsigned int>>* out_shapes) {
  const auto& x = in_shapes->at(0);
  if (x.size() != 4) return MX_FAIL;
  out_shapes->at(0) = std::vector<unsigned int>{x[0], x[1], 1, 1};
  return MX_SUCCESS;
}

// ncnn's bilinear coefficients of one axis (its linear_coeffs): source index and weights of
// each output position, computed in double then float as ncnn does.
void linear_coeffs(int in, int out, bool align_corners, std::vector<int>* index,
                   std::vector<float>* weight) {
  const double scale = align_corners ? static_cast<double>(in - 1) / (out - 1)
                                     : static_cast<double>(in) / out;
  index->resize(out);
  weight->resize(out);
  for (int d = 0; d < out; ++d) {
    float f = align_corners ? static_cast<float>(d * scale)
                            : static_cast<float>((d + 0.5) * scale - 0.5);
    int s = static_cast<int>(std::floor(f));
    f -= s;
    if (s < 0) { s = 0; f = 0.f; }
    if (s >= in - 1) { s = in - 2; f = 1.f; }
    (*index)[d] = s;
    (*weight)[d] = f;
  }
}

// p * a + q * b as ncnn's bilinear loops round it: fma(q, b, p * a) in its vectors,
// fma(p, a, q * b) in the scalar tail (GCC's contraction of the C expression, measured).
float blend(float p, float a, float q, float b, bool vector) {
  return vector ? std::fma(q, b, p * a) : std::fma(p, a, q * b);
}

// ncnn's unpacked bilinear Interp: each source row resized horizontally, S[x] * a0 +
// S[x + 1] * a1, then the two rows blended, r0 * b0 + r1 * b1 (``blend``).
MXReturnValue bilinear_forward(const std::unordered_map<std::string, std::string>& attrs,
                               std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                               const OpResource& res) {
  MXTensor& in = inputs->at(0);
  const int h = in.shape[2], w = in.shape[3];
  const int oh = std::stoi(attrs.at("height")), ow = std::stoi(attrs.at("width"));
  const bool align = attrs.count("align_corners") && attrs.at("align_corners") == "1";
  std::vector<int> xofs, yofs;
  std::vector<float> alpha, beta;
  linear_coeffs(w, ow, align, &xofs, &alpha);
  linear_coeffs(h, oh, align, &yofs, &beta);
  const float* x = in.data<float>();
  float* y = outputs->at(0).data<float>();
  const int64_t planes = in.shape[0] * in.shape[1];
  const int vector_end = ow - ow % 4;  // ncnn's vector loops; a scalar tail after them
#pragma omp parallel for
  for (int64_t p = 0; p < planes; ++p) {
    const float* src = x + p * h * w;
    float* dst = y + p * oh * ow;
    std::vector<float> row0(ow), row1(ow);
    for (int dy = 0; dy < oh; ++dy) {
      const float* s0 = src + yofs[dy] * w;
      const float* s1 = s0 + w;
      for (int dx = 0; dx < ow; ++dx) {
        const int sx = xofs[dx];
        const float a1 = alpha[dx], a0 = 1.f - a1;
        row0[dx] = blend(s0[sx], a0, s0[sx + 1], a1, dx < vector_end);
        row1[dx] = blend(s1[sx], a0, s1[sx + 1], a1, dx < vector_end);
      }
      const float b1 = beta[dy], b0 = 1.f - b1;
      for (int dx = 0; dx < ow; ++dx)
        dst[dy * ow + dx] = blend(row0[dx], b0, row1[dx], b1, dx < vector_end);
    }
  }
  return MX_SUCCESS;
}

MXReturnValue bilinear_shape(const std::unordered_map<std::string, std::string>& attrs,
                             std::vector<std::vector<unsigned int>>* in_shapes,
                             std::vector<std::vector<unsigned int>>* out_shapes) {
  const auto& x = in_shapes->at(0);
  if (x.size() != 4 || !attrs.count("height") || !attrs.count("width")) return MX_FAIL;
  out_shapes->at(0) = std::vector<unsigned int>{
      x[0], x[1], static_cast<unsigned int>(std::stoi(attrs.at("height"))),
      static_cast<unsigned int>(std::stoi(attrs.at("width")))};
  return MX_SUCCESS;
}

// Gluon builds a backward graph for a net with trainable parameters even when it only runs
// inference; these ops exist for verification and refuse to be differentiated.
MXReturnValue no_backward(const std::unordered_map<std::string, std::string>& attrs,
                          std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                          const OpResource& res) {
  MX_ERROR_MSG << "ncnn's fp32 arithmetic (qat_ncnn_*) is for verification only: no gradient";
  return MX_FAIL;
}

}  // namespace

REGISTER_OP(qat_ncnn_act)
.setParseAttrs(act_attrs)
.setInferType(float_type)
.setInferShape(same_shape)
.setForward(act_forward, "cpu")
.setBackward(no_backward, "cpu");

REGISTER_OP(qat_ncnn_bilinear)
.setParseAttrs(one_input)
.setInferType(float_type)
.setInferShape(bilinear_shape)
.setForward(bilinear_forward, "cpu")
.setBackward(no_backward, "cpu");

REGISTER_OP(qat_ncnn_global_avgpool)
.setParseAttrs(one_input)
.setInferType(float_type)
.setInferShape(pool_shape)
.setForward(pool_forward, "cpu")
.setBackward(no_backward, "cpu");
