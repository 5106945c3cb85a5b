// CPU emulation of the CUDA device API the MSDCN kernels use (for harness.cpp): one std::thread per
// CUDA thread, std::barrier for __syncthreads and for warp shuffles, std::atomic_ref for atomics. Without
// __CUDA_ARCH__ the kernels take their scalar-atomic paths. Needs C++20 (g++ >= 11).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(8) uint2 { unsigned x, y; };
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
struct alignas(8) int2 { int x, y; };
inline int2 make_int2(int a, int b) { return {a, b}; }
struct uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline double2 make_double2(double a, double b) { return {a, b}; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline float __fadd_rn(float a, float b) { return a + b; }  // g++ without -mfma: no contraction on x86-64
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32); }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __maxnreg__(...)
#define __restrict__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__

namespace emu {
inline thread_local dim3 tIdx, bIdx;
inline dim3 bDim, gDim;
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
inline std::vector<double> shfl_buf;
}
#define threadIdx (emu::tIdx)
#define blockIdx (emu::bIdx)
#define blockDim (emu::bDim)
#define gridDim (emu::gDim)
inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
template <class T> T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
// Warp shuffle: every lane of the warp must call it (as the kernels' full-mask shuffles require on a GPU).
// mode 0: from lane + delta (down), 1: lane - delta (up), 2: lane ^ delta (xor); out-of-warp sources keep v.
template <class T> T shfl_impl(T v, int delta, int mode) {
  const int tid = threadIdx.x, w = tid / 32, l = tid % 32;
  auto& bar = *emu::warp_bar[w];
  bar.arrive_and_wait();
  emu::shfl_buf[tid] = static_cast<double>(v);
  bar.arrive_and_wait();
  const int src = mode == 0 ? l + delta : mode == 1 ? l - delta : l ^ delta;
  T r = v;
  if (src >= 0 && src < 32 && w * 32 + src < static_cast<int>(emu::bDim.x)) r = static_cast<T>(emu::shfl_buf[w * 32 + src]);
  bar.arrive_and_wait();
  return r;
}
template <class T> T __shfl_up_sync(unsigned, T v, int o) { return shfl_impl(v, o, 1); }
template <class T> T __shfl_down_sync(unsigned, T v, int o) { return shfl_impl(v, o, 0); }
template <class T> T __shfl_xor_sync(unsigned, T v, int o) { return shfl_impl(v, o, 2); }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
