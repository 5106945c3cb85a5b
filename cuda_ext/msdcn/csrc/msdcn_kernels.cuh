// MSDCN forward and backward kernels (no PyTorch dependency; launched from msdcn_cuda.cu).
//
// Semantics are those of cuda_ext/msdcn/reference.py: for query (b, h, w), group g and point k the
// group's value map is sampled bilinearly at (w + off_x, h + off_y) with floor (or trunc) as the
// lower corner, each corner outside the grid contributes zero, and the K samples are summed with
// unnormalised weights. Coordinates and accumulation are in A (fp32, or fp64 for fp64 inputs).
//
// Mapping (as DCNv4): one thread per (query, group, 8 channels). L = C / 8 consecutive threads
// serve one (query, group); a block holds Q queries x G groups x L lanes. B, H, W, C, K are runtime
// values, so no shape ever triggers a recompile; all memory offsets are int64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace flowdcn {

constexpr int kVec = 8;         // channels per thread: 16-byte loads for bf16/fp16
constexpr int kMaxThreads = 512;  // threads per block at most (bounds the register budget)

// ---------------------------------------------------------------- scalar conversions
__device__ __forceinline__ float to_acc(float x, float) { return x; }
__device__ __forceinline__ double to_acc(double x, double) { return x; }
__device__ __forceinline__ float to_acc(__half x, float) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x, float) { return __bfloat162float(x); }

__device__ __forceinline__ void from_acc(float x, float* o) { *o = x; }
__device__ __forceinline__ void from_acc(double x, double* o) { *o = x; }
__device__ __forceinline__ void from_acc(float x, __half* o) { *o = __float2half_rn(x); }
__device__ __forceinline__ void from_acc(float x, __nv_bfloat16* o) { *o = __float2bfloat16_rn(x); }

// ---------------------------------------------------------------- 8-channel vector loads/stores
// Pointers are 16-byte aligned: the host checks the base address and C % 8 == 0.
// 16 bytes of bf16 or fp16 pairs (H2) -> 8 floats.
__device__ __forceinline__ float2 to_float2(__half2 h) { return __half22float2(h); }
template <typename H2>
__device__ __forceinline__ void unpack_pairs8(const uint4& r, float* o) {
  const H2* h = reinterpret_cast<const H2*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = to_float2(h[i]);
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}
// bf16 -> fp32 is exact and takes no arithmetic: a bf16 is the top half of the float with the same value. So a pair
// (element 0 in the low half) is one shift and one mask. __bfloat1622float2 compiled to three instructions per pair on
// sm_90 (PRMT + two shifts), and these unpacks sit in the inner loops of every kernel (one per 8 channels read).
template <>
__device__ __forceinline__ void unpack_pairs8<__nv_bfloat162>(const uint4& r, float* o) {
  const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = __uint_as_float(w[i] << 16);
    o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* o) {
  unpack_pairs8<__nv_bfloat162>(__ldg(reinterpret_cast<const uint4*>(p)), o);
}
__device__ __forceinline__ void load8(const __half* p, float* o) { unpack_pairs8<__half2>(__ldg(reinterpret_cast<const uint4*>(p)), o); }
__device__ __forceinline__ void load8(const float* p, float* o) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
  o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
__device__ __forceinline__ void load8(const double* p, double* o) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const double2 d = __ldg(reinterpret_cast<const double2*>(p) + i);
    o[2 * i] = d.x;
    o[2 * i + 1] = d.y;
  }
}

// 8 channels as loaded, converted only where used: 4 registers for bf16/fp16 instead of 8 (more loads in flight for
// the same registers). fp32/fp64 are held converted.
template <typename T, typename A>
struct Raw8 {
  A f[8];
};
template <>
struct Raw8<__nv_bfloat16, float> {
  uint4 r;
};
template <>
struct Raw8<__half, float> {
  uint4 r;
};
template <typename T, typename A>
__device__ __forceinline__ void load_raw8(const T* p, Raw8<T, A>& o) { load8(p, o.f); }
__device__ __forceinline__ void load_raw8(const __nv_bfloat16* p, Raw8<__nv_bfloat16, float>& o) {
  o.r = __ldg(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ void load_raw8(const __half* p, Raw8<__half, float>& o) { o.r = __ldg(reinterpret_cast<const uint4*>(p)); }
template <typename T, typename A>
__device__ __forceinline__ void zero_raw8(Raw8<T, A>& o) {
#pragma unroll
  for (int i = 0; i < 8; ++i) o.f[i] = A(0);
}
__device__ __forceinline__ void zero_raw8(Raw8<__nv_bfloat16, float>& o) { o.r = make_uint4(0, 0, 0, 0); }
__device__ __forceinline__ void zero_raw8(Raw8<__half, float>& o) { o.r = make_uint4(0, 0, 0, 0); }
template <typename T, typename A>
__device__ __forceinline__ void unpack8(const Raw8<T, A>& x, A* o) {
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = x.f[i];
}
__device__ __forceinline__ void unpack8(const Raw8<__nv_bfloat16, float>& x, float* o) { unpack_pairs8<__nv_bfloat162>(x.r, o); }
__device__ __forceinline__ void unpack8(const Raw8<__half, float>& x, float* o) { unpack_pairs8<__half2>(x.r, o); }

__device__ __forceinline__ void store8(__nv_bfloat16* p, const float* v) {
  uint4 r;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = r;
}
__device__ __forceinline__ void store8(__half* p, const float* v) {
  uint4 r;
  __half2* h = reinterpret_cast<__half2*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = r;
}
__device__ __forceinline__ void store8(float* p, const float* v) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(double* p, const double* v) {
#pragma unroll
  for (int i = 0; i < 4; ++i) reinterpret_cast<double2*>(p)[i] = make_double2(v[2 * i], v[2 * i + 1]);
}

// 4-channel halves, for the backward's split channel layout.
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float* o) {
  const uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
  const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
  o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
}
__device__ __forceinline__ void load4(const __half* p, float* o) {
  const uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&r);
  const float2 a = __half22float2(h[0]), b = __half22float2(h[1]);
  o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
}
__device__ __forceinline__ void load4(const float* p, float* o) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
}
__device__ __forceinline__ void load4(const double* p, double* o) {
  const double2 a = __ldg(reinterpret_cast<const double2*>(p)), b = __ldg(reinterpret_cast<const double2*>(p) + 1);
  o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
}
__device__ __forceinline__ void atomic_add4(float* p, const float* v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
#else
#pragma unroll
  for (int i = 0; i < 4; ++i) atomicAdd(p + i, v[i]);
#endif
}
__device__ __forceinline__ void atomic_add4(double* p, const double* v) {
#pragma unroll
  for (int i = 0; i < 4; ++i) atomicAdd(p + i, v[i]);
}

__device__ __forceinline__ void store4(float* p, const float* v) { *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]); }
__device__ __forceinline__ void store4(double* p, const double* v) {
  reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
}

// ---------------------------------------------------------------- shared-memory vector loads
// 16 bytes of shared memory in one 128-bit load. Written as a plain uint4 dereference feeding the bf16 unpack, nvcc split
// the load into four 32-bit loads (ld.shared.v2.u16 in the PTX): 4x the shared-memory requests, which made the first
// plane kernels (msdcn_plane.cuh) bound by shared-memory throughput (ncu, H200: L1/TEX 80 % busy, 0.12 ms forward at
// XL 16^2). An empty asm that takes the four words as operands makes the whole uint4 live at once, so the load stays one
// ld.shared.v4; the load itself is ordinary C++ (ordered by __syncthreads like any other shared access, unlike an
// ld.shared inside the asm, which the compiler would not know reads memory).
__device__ __forceinline__ uint4 lds128(const void* p) {
  uint4 r = *reinterpret_cast<const uint4*>(p);
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w));
#endif
  return r;
}
__device__ __forceinline__ float4 as_float4(uint4 r) {
  return make_float4(__uint_as_float(r.x), __uint_as_float(r.y), __uint_as_float(r.z), __uint_as_float(r.w));
}

// 8 channels of a plane row (the plane kernels, msdcn_plane.cuh) at a 32-bit shared-memory address in bytes (SAddr) ->
// accumulation type. Through a generic pointer (T* + r * 16 bytes) nvcc formed each row address in two instructions,
// (r * 8 + lane) * 2 + the shared window, one of ~33 per entry of the pull; from a shared address it is one shift-add.
// These loads are ld.shared inside asm, which the compiler does not know to read memory (see lds128): they are only
// used on planes that no thread writes between the same two barriers, and the asm is volatile, so they stay between them.
#if defined(__CUDA_ARCH__)
using SAddr = unsigned;
__device__ __forceinline__ SAddr saddr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ uint4 lds128_at(SAddr a) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(a));
  return r;
}
// One element (the split lanes' channel of the last unit, plane_split) as the accumulation type.
__device__ __forceinline__ float lds1_at(SAddr a, const __nv_bfloat16*) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(a));
  return __uint_as_float(static_cast<unsigned>(v) << 16);
}
__device__ __forceinline__ float lds1_at(SAddr a, const __half*) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(a));
  return __half2float(__ushort_as_half(v));
}
__device__ __forceinline__ float lds1_at(SAddr a, const float*) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ double lds1_at(SAddr a, const double*) {
  double v;
  asm volatile("ld.shared.f64 %0, [%1];\n" : "=d"(v) : "r"(a));
  return v;
}
#else
using SAddr = uintptr_t;  // the emulator: a host address
inline SAddr saddr(const void* p) { return reinterpret_cast<uintptr_t>(p); }
inline uint4 lds128_at(SAddr a) { return *reinterpret_cast<const uint4*>(a); }
template <typename T>
inline auto lds1_at(SAddr a, const T*) {
  return to_acc(*reinterpret_cast<const T*>(a), std::conditional_t<sizeof(T) == 8, double, float>());
}
#endif
__device__ __forceinline__ void lds8_at(SAddr a, const __nv_bfloat16*, float* o) { unpack_pairs8<__nv_bfloat162>(lds128_at(a), o); }
__device__ __forceinline__ void lds8_at(SAddr a, const __half*, float* o) { unpack_pairs8<__half2>(lds128_at(a), o); }
__device__ __forceinline__ void lds8_at(SAddr a, const float*, float* o) {
  const float4 x = as_float4(lds128_at(a)), y = as_float4(lds128_at(a + 16));
  o[0] = x.x; o[1] = x.y; o[2] = x.z; o[3] = x.w;
  o[4] = y.x; o[5] = y.y; o[6] = y.z; o[7] = y.w;
}
__device__ __forceinline__ void lds8_at(SAddr a, const double*, double* o) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 r = lds128_at(a + 16 * i);
    double d[2];
    memcpy(d, &r, 16);
    o[2 * i] = d[0];
    o[2 * i + 1] = d[1];
  }
}

// 4 accumulators of shared memory (16-byte aligned).
__device__ __forceinline__ void lds4(const float* p, float* o) {
  const float4 a = as_float4(lds128(p));
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
}
__device__ __forceinline__ void lds4(const double* p, double* o) {
  const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
  o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
}

// 2 accumulators of shared memory (8-byte aligned for float, 16 for double) in one access.
__device__ __forceinline__ void lds2(const float* p, float& a, float& b) {
  const float2 v = *reinterpret_cast<const float2*>(p);
  a = v.x;
  b = v.y;
}
__device__ __forceinline__ void lds2(const double* p, double& a, double& b) {
  const double2 v = *reinterpret_cast<const double2*>(p);
  a = v.x;
  b = v.y;
}
__device__ __forceinline__ void sts2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void sts2(double* p, double a, double b) { *reinterpret_cast<double2*>(p) = make_double2(a, b); }

// grad_value accumulates in an fp32 (fp64) buffer; sm_90 has 16-byte vector float atomics.
__device__ __forceinline__ void atomic_add8(float* p, const float* v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  atomicAdd(reinterpret_cast<float4*>(p) + 1, make_float4(v[4], v[5], v[6], v[7]));
#else
#pragma unroll
  for (int i = 0; i < kVec; ++i) atomicAdd(p + i, v[i]);
#endif
}
__device__ __forceinline__ void atomic_add8(double* p, const double* v) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) atomicAdd(p + i, v[i]);
}

// Rounded as written, never contracted into an FMA: a point's sample position (whose floor picks its cell) is computed
// by several kernels (the forward, which may bucket the point; the gather backward's count, fill and epilogue; the
// scatter kernels) that must agree on it bit for bit, whatever contraction the compiler picks in each.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }
__device__ __forceinline__ double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

// ---------------------------------------------------------------- parameters
template <typename T, typename F, typename A>
struct MsdcnParams {
  // value, off, scale and weight (and the gather backward's grad_value and the field grads) are read per pixel at a
  // stride (vs, os, fs elements): G*C, 2*G*K and G*K when they are contiguous tensors of their own; in the packed
  // layout (msdcn_*_packed: one [N, G*C + 4*G*K] projection, value | delta | scale_logit | weights) all three are that
  // row length. out, grad_out and the scatter backward's grad_value buffer are always contiguous [N, G, C].
  const T* value;     // [N, G, C] with N = B*H*W (rows ordered b, h, w), pixel n at n * vs
  const F* off;       // FUSED: delta [N, G, K, 2]; else offsets [N, G, K, 2]   (x, y); pixel n at n * os
  const F* scale;     // FUSED: scale_logit [N, G, K]; pixel n at n * fs
  const F* weight;    // [N, G, K]; pixel n at n * fs
  const A* prior;     // FUSED: [K, 2]
  const A* s0;        // FUSED: [G]
  const A* smax;      // FUSED: [2] (x, y)
  T* out;             // forward: [N, G, C]
  const T* gout;      // backward: [N, G, C]
  A* gvalue;          // backward: [N, G, C] fp32/fp64 accumulation buffer (zeroed)
  F* goff;            // backward: [N, G, K, 2] grad of offsets (or delta)
  F* gscale;          // backward, FUSED: [N, G, K]
  F* gweight;         // backward: [N, G, K]
  A* s0_part;         // backward, FUSED: [gridDim.x, G] per-block partial sums of d/ds0
  // Forward, when not null: also bucket every point for the gather backward, as its count kernel would (count[key] += 1;
  // key and rank per item; msdcn_gather.cuh), so the backward starts from the scan (msdcn_forward_packed_train).
  int* bucket_count;  // [NB] zeroed
  int* item_key;      // [N * G * K]
  int* item_rank;     // [N * G * K]
  int64_t N, H, W;
  int64_t vs, os, fs;  // per-pixel strides (elements) of value, off, scale/weight and of their grads (see above)
  int G, C, K, L, Q;  // L = C / 8 lanes per (query, group); Q queries per block and round
  int R;              // rounds of Q queries per block
  bool split;            // backward channel layout (see msdcn_backward_kernel)
  bool skip_value_grad;  // benchmark diagnostic: leave grad_value zero (never set by the ops)
  bool trunc;         // trunc (official compat) instead of floor for the lower corner
};

// Where point (n, g, k)'s fields are: f in scale/weight (and their grads), o (x; o + 1: y) in off (and its grad).
struct FieldIdx {
  int64_t f, o;
};
template <typename T, typename F, typename A>
__device__ __forceinline__ FieldIdx field_idx(const MsdcnParams<T, F, A>& p, int64_t n, int g, int k) {
  const int gk = g * p.K + k;
  return {n * p.fs + gk, n * p.os + 2 * gk};
}

// Offsets of point k in fp32/fp64; FUSED computes (delta + prior) * sigmoid(logit + s0) * S_max (rounded as written; the
// caller adds the query's coordinate with add_rn).
template <bool FUSED, typename T, typename F, typename A>
__device__ __forceinline__ void point_offset(const MsdcnParams<T, F, A>& p, FieldIdx fi, int g, int k, A& ox, A& oy) {
  const A dx = to_acc(p.off[fi.o], A()), dy = to_acc(p.off[fi.o + 1], A());
  if (FUSED) {
    const A s = sigmoid(to_acc(p.scale[fi.f], A()) + p.s0[g]);
    ox = mul_rn(mul_rn(add_rn(dx, p.prior[2 * k]), s), p.smax[0]);
    oy = mul_rn(mul_rn(add_rn(dy, p.prior[2 * k + 1]), s), p.smax[1]);
  } else {
    ox = dx;
    oy = dy;
  }
}

// Corner geometry of one sample; corner c = (dx, dy) in order (0,0), (1,0), (0,1), (1,1).
template <typename A>
struct Corners {
  int64_t row[4];  // pixel index (b*H + y)*W + x of each corner, valid only where ok[c]
  A bil[4];        // bilinear weight
  A ddx[4], ddy[4];  // derivative of bil w.r.t. px, py
  int64_t xi, yi;  // lower corner (floor or trunc), in [-1, W-1] x [-1, H-1], valid only where any
  bool ok[4];
  bool any;
};

template <typename A>
__device__ __forceinline__ Corners<A> corners(A px, A py, int64_t b, int64_t H, int64_t W, bool trunc_mode) {
  Corners<A> c;
  const A fx = trunc_mode ? trunc(px) : floor(px);
  const A fy = trunc_mode ? trunc(py) : floor(py);
  const A lx = px - fx, ly = py - fy;  // negative under trunc for px < 0 (official extrapolation)
  const A hx = A(1) - lx, hy = A(1) - ly;
  // Validity is decided in floating point, so huge or NaN offsets never reach an integer cast.
  const bool x0 = fx >= A(0) && fx <= A(W - 1), x1 = fx >= A(-1) && fx <= A(W - 2);
  const bool y0 = fy >= A(0) && fy <= A(H - 1), y1 = fy >= A(-1) && fy <= A(H - 2);
  c.ok[0] = x0 && y0; c.ok[1] = x1 && y0; c.ok[2] = x0 && y1; c.ok[3] = x1 && y1;
  c.any = (x0 || x1) && (y0 || y1);
  c.bil[0] = hx * hy; c.ddx[0] = -hy; c.ddy[0] = -hx;
  c.bil[1] = lx * hy; c.ddx[1] = hy;  c.ddy[1] = -lx;
  c.bil[2] = hx * ly; c.ddx[2] = -ly; c.ddy[2] = hx;
  c.bil[3] = lx * ly; c.ddx[3] = ly;  c.ddy[3] = lx;
  if (c.any) {
    const int64_t xi = static_cast<int64_t>(fx), yi = static_cast<int64_t>(fy);  // in [-1, W-1] / [-1, H-1]
    c.xi = xi;
    c.yi = yi;
    const int64_t r00 = (b * H + yi) * W + xi;
    c.row[0] = r00; c.row[1] = r00 + 1; c.row[2] = r00 + W; c.row[3] = r00 + W + 1;
  }
  return c;
}

// Field grads of point fi (group g, point k) from its four corner dots D = <value[corner], grad_out[query]>
// (0 for corners outside the grid) and its corner geometry c: stores grad of the weight and of the offsets (or,
// FUSED, of delta and scale_logit) and returns d/dlogit (FUSED; 0 otherwise) for the caller's d/ds0 sum.
template <bool FUSED, typename T, typename F, typename A>
__device__ __forceinline__ A point_field_grads(const MsdcnParams<T, F, A>& p, FieldIdx fi, int g, int k, const Corners<A>& c,
                                               const A* D) {
  A sw = A(0), sx = A(0), sy = A(0);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    sw += c.bil[j] * D[j];
    sx += c.ddx[j] * D[j];
    sy += c.ddy[j] * D[j];
  }
  const A wk = to_acc(p.weight[fi.f], A());
  const A gox = wk * sx, goy = wk * sy;  // d loss / d offset (x, y)
  from_acc(sw, &p.gweight[fi.f]);
  if (!FUSED) {
    from_acc(gox, &p.goff[fi.o]);
    from_acc(goy, &p.goff[fi.o + 1]);
    return A(0);
  }
  const A dx = to_acc(p.off[fi.o], A()), dy = to_acc(p.off[fi.o + 1], A());
  const A s = sigmoid(to_acc(p.scale[fi.f], A()) + p.s0[g]);
  const A sx_ = p.smax[0], sy_ = p.smax[1];
  from_acc(gox * s * sx_, &p.goff[fi.o]);
  from_acc(goy * s * sy_, &p.goff[fi.o + 1]);
  const A gl = (gox * (dx + p.prior[2 * k]) * sx_ + goy * (dy + p.prior[2 * k + 1]) * sy_) * s * (A(1) - s);
  from_acc(gl, &p.gscale[fi.f]);
  return gl;
}

// Sum of v over the block in a fixed order (warp shuffle trees, then the warps in order), valid in thread 0. Every thread of
// the block calls it (full-mask shuffles, one __syncthreads; blockDim a multiple of 32); red: 32 slots of shared memory.
template <typename A>
__device__ __forceinline__ A block_sum_ordered(A v, A* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  A tot = A(0);
  if (threadIdx.x == 0)
    for (int w = 0; w < static_cast<int>(blockDim.x + 31) / 32; ++w) tot += red[w];
  return tot;
}

// Bucket of a point whose cell (lower corner) is (xi, yi) in image b, group g: one per (cell, group), cells from -1, so
// x0, y0 in [-1, W-1] x [-1, H-1] (the gather backward's counting sort; msdcn_gather.cuh). The launchers check that
// B * (H + 1) * (W + 1) * G fits in int32.
__device__ __forceinline__ int bucket_of(int64_t b, int64_t xi, int64_t yi, int64_t H, int64_t W, int G, int g) {
  return static_cast<int>(((b * (H + 1) + yi + 1) * (W + 1) + xi + 1) * G + g);
}

// ---------------------------------------------------------------- per-point geometry in shared memory
// The L lanes of a (query, group) need the same corner rows and weights for every point; computing
// them once per (query, group, point) instead of once per lane removes ~40% of the forward's
// instructions (field loads, sigmoid, floor, 64-bit row arithmetic).
template <typename A>
struct __align__(16) PointGeo {
  int64_t row;  // pixel index of corner (0, 0); the others are row + 1, row + W, row + W + 1
  int mask;     // bit j: corner j inside the grid
  int pad;
  A cw[4];      // w_k * bilinear weight of each corner (0 outside the grid)
};

// COUNT: also bucket each point for the gather backward (p.bucket_count; a template switch, so the forward that does not
// count keeps its 48 registers: counting takes 56).
template <bool FUSED, bool COUNT, typename T, typename F, typename A>
__device__ __forceinline__ void fill_geometry(const MsdcnParams<T, F, A>& p, int64_t round0, PointGeo<A>* geo) {
  const int items = p.Q * p.G * p.K;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int iq = it / (p.G * p.K), rem = it - iq * p.G * p.K, ig = rem / p.K, ik = rem - ig * p.K;
    const int64_t n = round0 + iq;
    PointGeo<A> e;
    e.row = 0;
    e.mask = 0;
    e.pad = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) e.cw[j] = A(0);
    if (n < p.N) {
      const int64_t w = n % p.W, h = (n / p.W) % p.H, b = n / (p.H * p.W);
      const FieldIdx fi = field_idx(p, n, ig, ik);
      A ox, oy;
      point_offset<FUSED>(p, fi, ig, ik, ox, oy);
      const A wk = to_acc(p.weight[fi.f], A());
      const Corners<A> c = corners(add_rn(A(w), ox), add_rn(A(h), oy), b, p.H, p.W, p.trunc);
      if (COUNT) {  // the gather backward's count, done here where the geometry is at hand
        const int64_t i = (n * p.G + ig) * p.K + ik;
        const int key = c.any ? bucket_of(b, c.xi, c.yi, p.H, p.W, p.G, ig) : -1;
        p.item_key[i] = key;
        p.item_rank[i] = c.any ? atomicAdd(p.bucket_count + key, 1) : 0;
      }
      if (c.any) {
        e.row = c.row[0];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (c.ok[j]) {
            e.mask |= 1 << j;
            e.cw[j] = wk * c.bil[j];
          }
        }
      }
    }
    geo[it] = e;
  }
}

__device__ __forceinline__ int64_t corner_row(int64_t row, int j, int64_t W) {
  return row + (j & 1) + ((j >> 1) ? W : 0);
}

// ---------------------------------------------------------------- forward
// Block b handles the queries [b*Q*R, (b+1)*Q*R) in R rounds of Q: consecutive queries sample
// overlapping corners, so later rounds find them in this SM's L1 instead of L2.
// The 4 corner gathers of a point are issued before any is used and held as loaded (Raw8: 4 registers for bf16), so the
// kernel needs 48 registers instead of 59 (H200, XL: 0.089 vs 0.095 ms at 16², 0.347 vs 0.365 at 32²). Measured slower
// (bench/RESULTS.md, 2026-12-01): 2 points' gathers in flight per step (85 registers), and V > 1 runs of 8 channels
// per thread.
template <typename T, typename F, typename A, bool FUSED, bool COUNT = false, int MAXT = kMaxThreads, int MINB = 1>
__global__ void __launch_bounds__(MAXT, MINB) msdcn_forward_kernel(const MsdcnParams<T, F, A> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  PointGeo<A>* geo = reinterpret_cast<PointGeo<A>*>(smem_raw);  // [Q, G, K]
  const int tid = threadIdx.x;
  const int GL = p.G * p.L;
  const int q = tid / GL, r = tid - q * GL, g = r / p.L, lane = r - g * p.L;
  const int64_t GC = static_cast<int64_t>(p.G) * p.C;
  const int64_t choff = g * p.C + lane * kVec;
  const PointGeo<A>* mine = geo + (q * p.G + g) * p.K;
  for (int round = 0; round < p.R; ++round) {
    const int64_t round0 = (static_cast<int64_t>(blockIdx.x) * p.R + round) * p.Q;
    if (round0 >= p.N) break;  // uniform over the block
    fill_geometry<FUSED, COUNT>(p, round0, geo);
    __syncthreads();
    const int64_t n = round0 + q;
    if (q < p.Q && n < p.N) {
      A acc[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = A(0);
      for (int k = 0; k < p.K; ++k) {
        const PointGeo<A> e = mine[k];
        if (!e.mask) continue;
        Raw8<T, A> v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // issue all 4 gathers before using any of them
          if (e.mask & (1 << j)) {
            load_raw8(p.value + corner_row(e.row, j, p.W) * p.vs + choff, v[j]);
          } else {
            zero_raw8(v[j]);
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          A x[kVec];
          unpack8(v[j], x);
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[i] += e.cw[j] * x[i];
        }
      }
      store8(p.out + n * GC + choff, acc);
    }
    __syncthreads();  // geo is rewritten by the next round
  }
}

// ---------------------------------------------------------------- backward
// Per round of Q queries. Phase 0: per-point geometry into shared memory. Phase 1 (per thread):
// scatter cw * grad_out into the fp32 grad_value buffer with atomics, and keep per-corner partial
// dots <v_corner, grad_out> over the thread's 8 channels in shared memory. Phase 2 (per (query,
// group, point)): sum the L lanes' dots, apply the bilinear derivatives and the chain rule (weights,
// offsets or delta / scale_logit) and store; d/ds0 is summed per block, one partial per block.
template <typename T, typename F, typename A, bool FUSED, int MAXT = kMaxThreads, int MINB = 1>
__global__ void __launch_bounds__(MAXT, MINB) msdcn_backward_kernel(const MsdcnParams<T, F, A> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int nthreads = blockDim.x;
  const int items = p.Q * p.G * p.K;
  const int S = (4 * p.K) | 1;  // odd row stride: conflict-free shared-memory writes
  PointGeo<A>* geo = reinterpret_cast<PointGeo<A>*>(smem_raw);             // [Q, G, K]
  A* part = reinterpret_cast<A*>(geo + items);                             // [nthreads, S]: corner dots
  A* gl_buf = part + static_cast<int64_t>(nthreads) * S;                   // FUSED: [Q, G, K] d/dlogit
  const int tid = threadIdx.x;
  const int GL = p.G * p.L;
  const int q = tid / GL, r = tid - q * GL, g = r / p.L, lane = r - g * p.L;
  const int64_t GC = static_cast<int64_t>(p.G) * p.C;
  // Channels of this thread: two runs of 4. Split layout: [4*lane, +4) and [C/2 + 4*lane, +4), so
  // each atomic instruction of a group's lanes covers one contiguous span (whole 32-byte sectors).
  const int64_t ch0 = g * p.C + (p.split ? lane * 4 : lane * kVec);
  const int64_t ch1 = p.split ? ch0 + p.C / 2 : ch0 + 4;
  A* my = part + static_cast<int64_t>(tid) * S;
  const PointGeo<A>* mine = geo + (q * p.G + g) * p.K;
  A s0_sum = A(0);  // threads tid < G: this block's d/ds0[tid]

  for (int round = 0; round < p.R; ++round) {
    const int64_t round0 = (static_cast<int64_t>(blockIdx.x) * p.R + round) * p.Q;  // first query of the round
    if (round0 >= p.N) break;  // uniform over the block
    fill_geometry<FUSED, false>(p, round0, geo);
    __syncthreads();
    const int64_t n = round0 + q;
    if (q < p.Q && n < p.N) {
      A go[kVec];
      load4(p.gout + n * GC + ch0, go);
      load4(p.gout + n * GC + ch1, go + 4);
      for (int k = 0; k < p.K; ++k) {
        const PointGeo<A> e = mine[k];
        A d[4] = {A(0), A(0), A(0), A(0)};
        if (e.mask) {
          A v[4][kVec];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (e.mask & (1 << j)) {
              const int64_t base = corner_row(e.row, j, p.W) * p.vs;
              load4(p.value + base + ch0, v[j]);
              load4(p.value + base + ch1, v[j] + 4);
            } else {
#pragma unroll
              for (int i = 0; i < kVec; ++i) v[j][i] = A(0);
            }
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (!(e.mask & (1 << j))) continue;
#pragma unroll
            for (int i = 0; i < kVec; ++i) d[j] += v[j][i] * go[i];
            if (p.skip_value_grad) continue;  // benchmark diagnostic only (measures the atomics' share)
            A contrib[kVec];
#pragma unroll
            for (int i = 0; i < kVec; ++i) contrib[i] = e.cw[j] * go[i];
            const int64_t base = corner_row(e.row, j, p.W) * GC;
            atomic_add4(p.gvalue + base + ch0, contrib);
            atomic_add4(p.gvalue + base + ch1, contrib + 4);
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) my[4 * k + j] = d[j];
      }
    }
    __syncthreads();

    for (int it = tid; it < items; it += nthreads) {
      const int iq = it / (p.G * p.K), rem = it - iq * p.G * p.K, ig = rem / p.K, ik = rem - ig * p.K;
      const int64_t n2 = round0 + iq;
      if (n2 >= p.N) continue;
      const A* src = part + static_cast<int64_t>((iq * p.G + ig) * p.L) * S + 4 * ik;
      A D[4] = {A(0), A(0), A(0), A(0)};  // <v_corner, grad_out> over all C channels
      for (int l = 0; l < p.L; ++l) {
#pragma unroll
        for (int j = 0; j < 4; ++j) D[j] += src[l * S + j];
      }
      const int64_t w2 = n2 % p.W, h2 = (n2 / p.W) % p.H, b2 = n2 / (p.H * p.W);
      const FieldIdx fi = field_idx(p, n2, ig, ik);
      A ox, oy;
      point_offset<FUSED>(p, fi, ig, ik, ox, oy);
      const Corners<A> c = corners(add_rn(A(w2), ox), add_rn(A(h2), oy), b2, p.H, p.W, p.trunc);
      const A gl = point_field_grads<FUSED>(p, fi, ig, ik, c, D);  // D[j] is 0 for corners outside the grid
      if (FUSED) gl_buf[it] = gl;
    }
    __syncthreads();  // geo, partials and gl_buf are rewritten by the next round
    if (FUSED && tid < p.G) {
      const int64_t left = p.N - round0;
      const int nq = left < p.Q ? static_cast<int>(left) : p.Q;  // queries present in this round
      for (int iq = 0; iq < nq; ++iq)
        for (int ik = 0; ik < p.K; ++ik) s0_sum += gl_buf[(iq * p.G + tid) * p.K + ik];
    }
  }
  if (FUSED && tid < p.G) p.s0_part[static_cast<int64_t>(blockIdx.x) * p.G + tid] = s0_sum;
}

}  // namespace flowdcn
