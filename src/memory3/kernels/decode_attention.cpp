// Single-token attention over a bfloat16 KV cache on a CPU, fused (AVX-512).
//
// One decoding step of a Memory3 model attends over [memory slots, context slots] of its KV cache
// (memory3/model.py, KVCache). For each (batch row, kv head), the G query heads of the group
// read each key and each value once: scores q·k in float32, softmax, weighted sum of the values,
// with nothing written to memory in between. Blocks of four masked slots are not read at all.
// Built with -march=native by memory3/kernels/__init__.py; on a CPU without AVX-512 the module
// builds without the kernel, `available()` says so and the caller uses its matmul path.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)

// 32 bfloat16 → two vectors of 16 float32: the even-indexed elements and the odd-indexed
// ones. A bfloat16 is the high half of a float32, so each takes one instruction.
inline void load_bf16x32(const uint16_t* p, __m512& even, __m512& odd) {
  const __m512i x = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// 16 bfloat16 → 16 float32 in order.
inline __m512 load_bf16x16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The sums of four vectors: [Σa, Σb, Σc, Σd].
inline __m256 fold(__m512 a) {  // the two halves added
  const __m256 hi = _mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(a), 1));
  return _mm256_add_ps(_mm512_castps512_ps256(a), hi);
}

inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold(a), fold(b)), _mm256_hadd_ps(fold(c), fold(d)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// exp of 16 floats ≤ 0: x = n·ln2 + r, |r| ≤ ln2/2, exp(r) by its degree-6 Taylor polynomial
// (relative error < 2e-7 there), scaled by 2^n. Inputs below -87 (masked scores, -inf) give
// exp(-87) ≈ 1.6e-38: a masked slot adds that to the softmax sum but is never read as a value.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Softmax of one row of S scores in place (-inf where masked); all masked gives zeros.
inline void softmax_row(float* row, int64_t S) {
  const float ninf = -std::numeric_limits<float>::infinity();
  __m512 m16 = _mm512_set1_ps(ninf);
  int64_t s = 0;
  for (; s + 16 <= S; s += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(row + s));
  float mx = _mm512_reduce_max_ps(m16);
  for (int64_t t = s; t < S; ++t) mx = row[t] > mx ? row[t] : mx;
  if (mx == ninf) {
    for (s = 0; s < S; ++s) row[s] = 0.f;
    return;
  }
  const __m512 m = _mm512_set1_ps(mx);
  __m512 total = _mm512_setzero_ps();
  for (s = 0; s + 16 <= S; s += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + s), m));
    _mm512_storeu_ps(row + s, e);
    total = _mm512_add_ps(total, e);
  }
  if (s < S) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (S - s)) - 1);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + s), m));
    _mm512_mask_storeu_ps(row + s, tail, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
  }
  const float inv = 1.f / _mm512_reduce_add_ps(total);
  const __m512 inv16 = _mm512_set1_ps(inv);
  for (s = 0; s + 16 <= S; s += 16) _mm512_storeu_ps(row + s, _mm512_mul_ps(_mm512_loadu_ps(row + s), inv16));
  for (; s < S; ++s) row[s] *= inv;
}

constexpr int64_t kMaxG = 8, kMaxChunks = 4;  // up to 8 query heads per kv head, D ≤ 144
constexpr int64_t kAhead = 32;  // how many keys ahead to prefetch

bool supported(int64_t G, int64_t D) { return G <= kMaxG && D % 16 == 0 && D / 32 <= kMaxChunks; }

// One (batch row, kv head): q (G, D) float32, already scaled; keys and values rows of D bfloat16
// with row stride `rs`; visible (S) bool; scores scratch of G·S floats; out (G, D) float32.
// D is cut into chunks of 32, read as even and odd elements (see load_bf16x32), and a last
// chunk of 16 read in order when D is an odd multiple of 16. Keys are scored four at a time
// so that their four sums are reduced together, each key read and widened once for all G heads.
// G is a template parameter: with it known, the compiler keeps q and the accumulators in
// registers (2.5× faster than with G a variable, measured while writing it).
template <int64_t G>
void attend_group(const float* q, const uint16_t* k, const uint16_t* v, int64_t rs,
                  const bool* visible, int64_t S, int64_t D, float* scores, float* out) {
  const int64_t nc = D / 32;
  const bool tail = D % 32 != 0;
  const int64_t t0 = 32 * nc;  // where the tail chunk starts
  const float ninf = -std::numeric_limits<float>::infinity();
  __m512 qe[kMaxG][kMaxChunks], qo[kMaxG][kMaxChunks], qt[kMaxG];  // q split like the keys
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < nc; ++c) {
      alignas(64) float e[16], o[16];
      for (int i = 0; i < 16; ++i) {
        e[i] = q[g * D + 32 * c + 2 * i];
        o[i] = q[g * D + 32 * c + 2 * i + 1];
      }
      qe[g][c] = _mm512_load_ps(e);
      qo[g][c] = _mm512_load_ps(o);
    }
    qt[g] = tail ? _mm512_loadu_ps(q + g * D + t0) : _mm512_setzero_ps();
  }
  // q·k for every query head of one key, the key read and widened once: G vectors of partial sums
  auto dots = [&](int64_t s, __m512* acc) {
    const uint16_t* kr = k + s * rs;
    const __m512 kt = tail ? load_bf16x16(kr + t0) : _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_mul_ps(qt[g], kt);
    for (int64_t c = 0; c < nc; ++c) {
      __m512 ke, ko;
      load_bf16x32(kr + 32 * c, ke, ko);
      for (int64_t g = 0; g < G; ++g) {
        acc[g] = _mm512_fmadd_ps(qe[g][c], ke, acc[g]);
        acc[g] = _mm512_fmadd_ps(qo[g][c], ko, acc[g]);
      }
    }
  };
  auto seen = [&](int64_t s) { return visible[s]; };
  int64_t s = 0;
  for (; s + 4 <= S; s += 4) {
    if (!(seen(s) || seen(s + 1) || seen(s + 2) || seen(s + 3))) {
      for (int64_t g = 0; g < G; ++g) _mm_storeu_ps(scores + g * S + s, _mm_set1_ps(ninf));
      continue;
    }
    // the keys a few blocks ahead, and the values of this block for the second pass: the
    // hardware prefetcher alone leaves this loop waiting on memory
    for (int64_t j = 0; j < 4 * rs; j += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(k + (s + kAhead) * rs + j), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v + s * rs + j), _MM_HINT_T1);
    }
    __m512 a0[kMaxG], a1[kMaxG], a2[kMaxG], a3[kMaxG];
    dots(s, a0);
    dots(s + 1, a1);
    dots(s + 2, a2);
    dots(s + 3, a3);
    for (int64_t g = 0; g < G; ++g) _mm_storeu_ps(scores + g * S + s, sum4(a0[g], a1[g], a2[g], a3[g]));
  }
  for (; s < S; ++s) {
    __m512 a[kMaxG];
    dots(s, a);
    for (int64_t g = 0; g < G; ++g) scores[g * S + s] = seen(s) ? _mm512_reduce_add_ps(a[g]) : ninf;
  }
  for (s = 0; s < S; ++s)
    if (!seen(s))
      for (int64_t g = 0; g < G; ++g) scores[g * S + s] = ninf;
  for (int64_t g = 0; g < G; ++g) softmax_row(scores + g * S, S);

  __m512 ae[kMaxG][kMaxChunks], ao[kMaxG][kMaxChunks], at[kMaxG];
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < nc; ++c) ae[g][c] = ao[g][c] = _mm512_setzero_ps();
    at[g] = _mm512_setzero_ps();
  }
  for (s = 0; s < S; ++s) {
    if (!seen(s)) continue;
    const uint16_t* vr = v + s * rs;
    __m512 p[kMaxG];
    for (int64_t g = 0; g < G; ++g) p[g] = _mm512_set1_ps(scores[g * S + s]);
    for (int64_t c = 0; c < nc; ++c) {
      __m512 ve, vo;
      load_bf16x32(vr + 32 * c, ve, vo);
      for (int64_t g = 0; g < G; ++g) {
        ae[g][c] = _mm512_fmadd_ps(p[g], ve, ae[g][c]);
        ao[g][c] = _mm512_fmadd_ps(p[g], vo, ao[g][c]);
      }
    }
    if (tail) {
      const __m512 vt = load_bf16x16(vr + t0);
      for (int64_t g = 0; g < G; ++g) at[g] = _mm512_fmadd_ps(p[g], vt, at[g]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < nc; ++c) {
      alignas(64) float e[16], o[16];
      _mm512_store_ps(e, ae[g][c]);
      _mm512_store_ps(o, ao[g][c]);
      for (int i = 0; i < 16; ++i) {
        out[g * D + 32 * c + 2 * i] = e[i];
        out[g * D + 32 * c + 2 * i + 1] = o[i];
      }
    }
    if (tail) _mm512_storeu_ps(out + g * D + t0, at[g]);
  }
}
#endif

}  // namespace

bool available() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

bool supports(int64_t H, int64_t K, int64_t D) {
#if defined(__AVX512F__)
  return K > 0 && H % K == 0 && supported(H / K, D);
#else
  return false;
#endif
}

// q (B, H, D) float32; k, v (B, K, S, D) bfloat16, each (S, D) block contiguous (a slice of a
// cache along S is); visible (B, S) bool. Returns (B, H, D) float32:
// softmax(q·kᵀ/√D over the visible slots)·v, zeros for a row with no visible slot.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor visible) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "q must be (B, H, D), k and v (B, K, S, D)");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32, "q must be float32");
  TORCH_CHECK(k.scalar_type() == torch::kBFloat16 && v.scalar_type() == torch::kBFloat16,
              "k and v must be bfloat16");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(visible.scalar_type() == torch::kBool && visible.dim() == 2, "visible must be (B, S) bool");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t K = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v differ in shape");
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "q and k disagree on batch size or head dim");
  TORCH_CHECK(supports(H, K, D), "unsupported head layout H=", H, " K=", K, " D=", D);
  TORCH_CHECK(visible.size(0) == B && visible.size(1) == S, "visible must be (B, S)");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == D && v.stride(2) == D,
              "each (S, D) block of k and v must be contiguous");
  TORCH_CHECK(k.stride(0) == v.stride(0) && k.stride(1) == v.stride(1), "k and v must have the same strides");
#if defined(__AVX512F__)
  const int64_t G = H / K;
  const auto qs = (q * (1.0 / std::sqrt(static_cast<double>(D)))).contiguous();
  const auto vis = visible.contiguous();
  auto out = torch::empty({B, H, D}, q.options());
  const float* qp = qs.data_ptr<float>();
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  const bool* mp = vis.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t sb = k.stride(0), sk = k.stride(1);
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * S);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / K, h = i % K;
      const float* qi = qp + (b * H + h * G) * D;
      const uint16_t* ki = kp + b * sb + h * sk;
      const uint16_t* vi = vp + b * sb + h * sk;
      float* oi = op + (b * H + h * G) * D;
      switch (G) {  // the group size as a constant, so that the accumulators stay in registers
        case 1: attend_group<1>(qi, ki, vi, D, mp + b * S, S, D, scores.data(), oi); break;
        case 2: attend_group<2>(qi, ki, vi, D, mp + b * S, S, D, scores.data(), oi); break;
        case 3: attend_group<3>(qi, ki, vi, D, mp + b * S, S, D, scores.data(), oi); break;
        case 4: attend_group<4>(qi, ki, vi, D, mp + b * S, S, D, scores.data(), oi); break;
        case 5: attend_group<5>(qi, ki, vi, D, mp + b * S, S, D, scores.data(), oi); break;
        case 6: attend_group<6>(qi, ki, vi, D, mp + b * S, S, D, scores.data(), oi); break;
        case 7: attend_group<7>(qi, ki, vi, D, mp + b * S, S, D, scores.data(), oi); break;
        default: attend_group<8>(qi, ki, vi, D, mp + b * S, S, D, scores.data(), oi); break;
      }
    }
  });
  return out;
#else
  return torch::Tensor();
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "Whether this build has the AVX-512 kernel");
  m.def("supports", &supports, "Whether the kernel takes H query heads over K kv heads of dim D");
  // no Python object is touched inside: other Python threads (a server's) run meanwhile
  m.def("decode_attention", &decode_attention, "Fused single-token attention over a bfloat16 KV cache",
        py::call_guard<py::gil_scoped_release>());
}
