// "Plane" MSDCN kernels for small grids: one block per (image, group) with the group's whole value plane (and, backward,
// its grad_out plane) in shared memory.
//
// At small grids (256 px training: 16x16 tokens) the gather backward is bound by latency, not bytes: its pull walks
// bucket lists through L2 (entry -> grad_out row), one dependent chain per entry, at 37.5 % occupancy (0.177 of its
// 0.354 ms at XL 16^2 on an H200). But there an image's plane of one group is small (16 * 16 * 72 bf16 = 36 KB), and
// every sampling point of the image's queries reads inside it (or outside the grid: zero padding). So a block loads the
// plane once (16-byte async copies, overlapped with the point geometry) and does every gather from shared memory:
//
// Backward, block (b, g):
//   1. copy the value and grad_out planes to shared memory (cp.async), zero the cell counts;
//   2. per point: geometry (the forward's), its cell (lower corner, cells from -1 as in the gather backward) and
//      inside-mask into shared memory, count[cell] += 1 (native shared integer atomics);
//   3. exclusive scan of the counts (one warp);
//   4. per point: the four corner dots <value[corner], grad_out[query]> over C from the planes, the chain rule of the
//      field grads (as the gather epilogue; d/ds0 summed in registers), and its entry in its cell's list: the query's
//      row, the weight times the x factors of the bilinear weights and ly, stored at the entry's index;
//   4b. the entries repacked as 16-byte records into the value plane's space (dead after the dots);
//   5. per (pair of pixels in a row, 8 channels; plane_split): grad_value = sum over the entries of the cells the
//      pixels are corners of of w * bil * grad_out[query] (the gather pull, from shared memory), written once in the
//      value's dtype;
//   6. d/ds0: the block's sum in a fixed order (warp trees, then the warps in order), one partial per (group, image).
// Entries in a cell follow the shared atomics' order, so grad_value's fp32 sums have no fixed order (as the gather
// backward's); every other grad is computed in a fixed order.
//
// Forward, block (b, g): the value plane (cp.async) and every point's corners and weights in shared memory, then one
// thread per (query, 8 channels; plane_split) sums its K points' corners from the plane.
//
// A shape is served when the block's shared memory fits the device (plane_layout): at C = 72, K = 9 in bf16 up to 22 x 22
// tokens backward on an H200 (23 x 23 needs 234944 bytes, 2.4 KB over a block's limit); larger grids take the gather
// backward and the regular forward.
#pragma once

#include <algorithm>
#include <type_traits>

#include "msdcn_kernels.cuh"

namespace flowdcn {

constexpr int kPlaneMaxThreads = 1024;  // largest block of the plane kernels
// The backward's register cap for 16-bit values: two blocks of 576 threads per SM (plane_threads) need
// <= 65536 / 1152 = 56 registers. Without the cap nvcc took 57-58 on sm_90 once the corner dots lost their branches (all
// four corners' loads in flight); with it, 56 and no spills in the fused (model's) kernels, 4 bytes in the unfused ones
// since the pull sums pairs of pixels (two sets of accumulators). fp32/fp64 planes are twice as large or more (one block
// per SM at the shapes where 16-bit values fit two) and keep the 1024-thread bound's 64; at 64, nvcc 13 spills 32-52
// bytes there (the four corners' fp32 loads in flight, the pull's pairs), which those (non-model) dtypes pay.
template <typename T>
constexpr int plane_backward_regs() {
  return sizeof(T) == 2 ? 56 : 64;
}
// __maxnreg__ is CUDA 12.4+; older toolkits get the 1024-thread launch bound (<= 64 registers: correct, and for 16-bit
// values plane_threads then picks two blocks of 512 threads per SM instead of 576).
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define FLOWDCN_PLANE_BACKWARD_BOUNDS(T) __maxnreg__(plane_backward_regs<T>())
#else
#define FLOWDCN_PLANE_BACKWARD_BOUNDS(T) __launch_bounds__(kPlaneMaxThreads)
#endif
// The forward's: two 1024-thread blocks per SM for 16-bit values (their shared memory fits two at XL 16^2), so <= 32
// registers (nvcc took 43 for the split last unit, plane_split; 32 without spills). Larger values fit one block per SM.
template <typename T>
constexpr int plane_forward_min_blocks() {
  return sizeof(T) == 2 ? 2 : 1;
}

// ---------------------------------------------------------------- shared-memory helpers
// 16 bytes global -> shared without a round trip through registers (sm_80+; a plain copy elsewhere and in the emulator).
__device__ __forceinline__ void copy16_async(void* dst_smem, const void* src_gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst_smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src_gmem));
#else
  *reinterpret_cast<uint4*>(dst_smem) = *reinterpret_cast<const uint4*>(src_gmem);
#endif
}
__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

// ---------------------------------------------------------------- layout (shared by the launchers, the emulator, the kernels)
// A plane row holds C channels at a stride of rs elements: rs * sizeof(T) is an odd number of 16-byte units, so the
// 16-byte loads of 8 lanes reading 8 different rows (a quarter-warp's shared-memory wavefront) hit 8 distinct bank
// quads when the rows are consecutive (C = 72 bf16: 9 units, no padding; C = 64: 8 -> 9 units).
inline int plane_row_stride(int C, size_t tbytes) {
  const int per_unit = static_cast<int>(16 / tbytes);  // elements per 16 bytes (2 for fp64)
  const int units = C / per_unit;
  return (units % 2 == 0 ? units + 1 : units) * per_unit;
}

// n / d for the plane kernels' index divisions (by K, W, W + 1, the lanes per pixel, the 16-byte units per row), as one
// multiply-high: exact while n * (d - 1) < 2^32, which n, d < 2^16 guarantee (point indices: plane_indices_fit; pixels
// and cells: below 2^12; tasks and 16-byte units: below 2^14, bounded by shared memory). A division by a runtime
// divisor is a sequence of about 20 instructions around a MUFU.RCP: ncu put 13 % of the plane forward's stall samples on
// the per-point i / K and q / W.
struct FastDiv {
  unsigned m;  // ceil(2^32 / d); unused for d = 1 (it would not fit)
  int d;
};
inline FastDiv fast_div(int d) { return {d == 1 ? 0u : static_cast<unsigned>((0x100000000ull + d - 1) / d), d}; }
__device__ __forceinline__ int fdiv(int n, const FastDiv& f) {
  return f.d == 1 ? n : static_cast<int>(__umulhi(static_cast<unsigned>(n), f.m));
}

// Lanes of the per-pixel loops (the forward's per query, the pull's per pixel), one per 8 channels, except at
// C = 8 * (8n + 1) with n >= 1 (C = 72: 9 units): there the 8n lanes of a pixel each take one 16-byte unit and the last 8
// also one channel each of the last unit. Why: a quarter-warp's 8 lanes form one shared-memory wavefront of 16-byte
// loads, and 8 lanes reading 8 consecutive units of one row never conflict. With 9 lanes per pixel, 7 of 9 quarter-warps
// straddle two pixels, whose rows (random: sample corners, entries' queries) collide in a bank quad most of the time:
// ncu showed both plane kernels bound by shared memory (L1/TEX 83 % busy at XL 16^2 on an H200). Measured there: the
// forward 0.064 -> 0.058 ms (also 2 tasks per thread of 1024, not 2.25); the pull unchanged (~0.061 ms: as many
// instructions per entry, so it is bound by issue rather than by shared memory).
inline bool plane_split(int L) { return L > 8 && L % 8 == 1; }

// The value plane's image rows are padded so that the rows of neighbouring pixels fall in different bank quads: a
// quarter-warp of the backward's corner dots reads the rows of 8 points (one thread each), and with rows at an odd
// stride of rsu units alone the quad of pixel (x, y) is rsu * (x + y * W) mod 8, which ignores y whenever 8 divides W
// (W = 16: every vertical neighbour collides). With an image row of W * rsu + pad units, pad chosen so that the row is
// 3 * rsu (mod 8), the quad is rsu * (3 * y + x) mod 8: the 4 corners of a cell (0, 1, 3, 4) and a 3 x 3 neighbourhood
// (-4 .. 4, only -4 and 4 coincide) land in distinct quads. Simulated on the benchmark's fields at XL 16^2 (random
// offsets): 10.8 -> 9.5 wavefronts per point for the dots. The grad_out plane is read a whole row per 8 lanes (no
// conflicts either way) and keeps W * rs.
inline int plane_image_row_pad(int64_t W, int rsu) { return static_cast<int>(((3 - W % 8 + 8) * rsu) % 8); }

// The backward keeps its per-point lists small enough for two blocks per SM at XL 16^2 (110 KB): 16 bytes per point with
// fp32 accumulation ((w * (1 - lx), w * lx) 8, ly 4, a 16-bit cell (plane_indices_fit) and a 16-bit grad_out row offset
// in 16-byte units (below 2^14: the plane fits in shared memory)).
struct PlaneLayout {
  int rs;                 // plane row stride (elements); rs * sizeof(T) is a multiple of 16 bytes
  int ys;                 // value plane image-row stride (elements): W * rs + the bank pad (plane_image_row_pad)
  size_t vpl, opl;        // value plane: pixel (x, y) at y * ys + x * rs, then one row of zeros at H * ys (the zero
                          // padding: corners outside the grid read it, so the inner loops have no branches) of T;
                          // backward: after the dots the same space holds the pull's entry records, [P, 4] of A (it is
                          // sized for both); grad_out plane (backward) [H*W, rs]
  size_t ptw;             // forward: [P, 4] of A, corner weights w * bil (0 outside the grid); backward: [P] of A, the
                          // entries' ly (offset from their cell's corner (0, 0) in y)
  size_t pwx;             // backward: [P, 2] of A, the entries' weights times the x factors of the bilinear weights:
                          // (w * (1 - lx), w * lx)
  size_t pinfo;           // backward: [P] uint16, cell | inside-mask << 12, or kNoCell when no corner is inside the grid;
                          // forward: [P] 4 x uint16, the plane rows of the corners in 16-byte units (the zero row outside)
  size_t ent;             // backward: [P] uint16, the entries' grad_out plane rows in 16-byte units (their queries), the
                          // points sorted by cell
  size_t cstart;          // backward: [cells + 1] int, exclusive scan of the counts
  size_t ccur;            // backward: [cells] int, counts, then each cell's next free entry
  size_t red;             // backward: [32] A, the warps' d/ds0 partials
  size_t bytes;           // total
  FastDiv K, W, W1, W2;   // divisions by K, W, W + 1, (W + 1) / 2 (the pull's pixel pairs per row)
  FastDiv units;          // by the 16-byte units of a row (C * sizeof(T) / 16; plane_load)
  FastDiv lanes;          // by the lanes per pixel (C / 8, or C / 8 - 1 where split)
  bool split;             // the last 8 channels are split over the last 8 lanes of a pixel (plane_split)
  int diag;               // benchmark diagnostic only (FLOWDCN_MSDCN_PLANE_DIAG; wrong grads): backward bit 0 skips the
                          // grad_value pull, bit 1 the corner dots, bit 2 the field grads
};
constexpr unsigned short kNoCell = 0xffff;

inline size_t align16(size_t x) { return (x + 15) / 16 * 16; }

// P = H * W * K points; cells = (H + 1) * (W + 1) (lower corners from -1).
inline PlaneLayout plane_layout(int64_t H, int64_t W, int C, int K, size_t tbytes, size_t abytes, bool backward) {
  PlaneLayout l{};
  const int64_t HW = H * W, P = HW * K, cells = (H + 1) * (W + 1);
  l.rs = plane_row_stride(C, tbytes);
  const int rsu = static_cast<int>(l.rs * tbytes / 16);
  l.ys = static_cast<int>(W) * l.rs + plane_image_row_pad(W, rsu) * static_cast<int>(16 / tbytes);
  const int L = C / 8;  // kVec
  l.split = plane_split(L);
  l.K = fast_div(K);
  l.W = fast_div(static_cast<int>(W));
  l.W1 = fast_div(static_cast<int>(W) + 1);
  l.W2 = fast_div(static_cast<int>(W + 1) / 2);
  l.units = fast_div(static_cast<int>(C * tbytes / 16));
  l.lanes = fast_div(l.split ? L - 1 : L);
  size_t at = 0;
  l.vpl = at;
  const size_t vbytes = (static_cast<size_t>(H) * l.ys + l.rs) * tbytes;
  at = align16(at + (backward ? std::max(vbytes, static_cast<size_t>(P) * 4 * abytes) : vbytes));
  if (!backward) {
    l.ptw = at;
    at = align16(at + static_cast<size_t>(P) * 4 * abytes);
    l.pinfo = at;
    at = align16(at + static_cast<size_t>(P) * 8);
    l.bytes = at;
    return l;
  }
  l.opl = at;
  at = align16(at + static_cast<size_t>(HW) * l.rs * tbytes);
  l.ptw = at;
  at = align16(at + static_cast<size_t>(P) * abytes);
  l.pwx = at;
  at = align16(at + static_cast<size_t>(P) * 2 * abytes);
  l.pinfo = at;
  at = align16(at + static_cast<size_t>(P) * 2);
  l.ent = at;
  at = align16(at + static_cast<size_t>(P) * 2);
  l.cstart = at;
  at = align16(at + static_cast<size_t>(cells + 1) * 4);
  l.ccur = at;
  at = align16(at + static_cast<size_t>(cells) * 4);
  l.red = at;
  at = align16(at + 32 * abytes);
  l.bytes = at;
  return l;
}

// Index limits of the plane kernels: cells < 2^12 (pinfo packs the mask above them in 16 bits, so no valid info equals
// kNoCell), P < 2^16 (FastDiv: the divisions by K of point indices), B * G blocks < 2^31. The other numerators (tasks
// H * W * lanes, plane_load's H * W * units, 16-byte row offsets) index shared memory in units of at least 16 bytes, so
// they stay below 2^14. Shared memory bounds the grids served first in practice (C = 72, K = 9 bf16: 22 x 22).
inline bool plane_indices_fit(int64_t B, int64_t H, int64_t W, int64_t G, int64_t K) {
  const int64_t P = H * W * K;
  return (H + 1) * (W + 1) < (int64_t(1) << 12) && P < (int64_t(1) << 16) && B * G < (int64_t(1) << 31) && P > 0;
}

// Copy a [H*W] x C slab of group g of image b (pixel n at n * stride elements) into a plane (pixel (x, y) at
// y * ys + x * rs), in 16-byte units, asynchronously (copy_async_wait + __syncthreads before use).
template <typename T>
__device__ __forceinline__ void plane_load(T* plane, int rs, int ys, const T* src, int64_t stride, int64_t HW, const FastDiv& units,
                                           const FastDiv& W) {
  const int per_unit = static_cast<int>(16 / sizeof(T));
  const int total = static_cast<int>(HW) * units.d;  // 32-bit index math: a plane fits in shared memory
  for (int t = threadIdx.x; t < total; t += blockDim.x) {
    const int pix = fdiv(t, units), u = t - pix * units.d, y = fdiv(pix, W);
    copy16_async(plane + y * ys + (pix - y * W.d) * rs + u * per_unit, src + pix * stride + u * per_unit);
  }
}

// An int carried in the bits of an accumulator (the pull's records) and back.
__device__ __forceinline__ float int_bits(int v, float) { return __int_as_float(v); }
__device__ __forceinline__ double int_bits(int v, double) { return __longlong_as_double(v); }
__device__ __forceinline__ int bits_int(float a) { return __float_as_int(a); }
__device__ __forceinline__ int bits_int(double a) { return static_cast<int>(__double_as_longlong(a)); }

// Zero the plane's row at element offset at (the zero padding), rs elements; ordered with the plane's use by the same
// __syncthreads.
template <typename T>
__device__ __forceinline__ void plane_zero_row(T* plane, int rs, int at) {
  uint4* z = reinterpret_cast<uint4*>(plane + at);
  const int units = rs * static_cast<int>(sizeof(T)) / 16;
  for (int t = threadIdx.x; t < units; t += blockDim.x) z[t] = make_uint4(0, 0, 0, 0);
}
// Geometry of point i = q * K + k of block (b, g) (q: the query's pixel inside the image).
template <bool FUSED, typename T, typename F, typename A>
__device__ __forceinline__ Corners<A> plane_point(const MsdcnParams<T, F, A>& p, const PlaneLayout& lay, int64_t b, int g, int q, int k,
                                                FieldIdx& fi) {
  const int64_t n = b * p.H * p.W + q;
  fi = field_idx(p, n, g, k);
  A ox, oy;
  point_offset<FUSED>(p, fi, g, k, ox, oy);
  const int W = static_cast<int>(p.W), y = fdiv(q, lay.W);  // 32-bit: H * W fits in shared memory
  return corners(add_rn(A(q - y * W), ox), add_rn(A(y), oy), int64_t(0), p.H, p.W, p.trunc);
}

// ---------------------------------------------------------------- backward
// grid: B * G blocks, block = b * G + g. gvalue: grad_value in the value's dtype, pixel n at n * p.vs (the value's layout).
// p.s0_part (FUSED): [G, B] per-(group, image) sums of d/ds0.
template <typename T, typename F, typename A, bool FUSED>
__global__ void FLOWDCN_PLANE_BACKWARD_BOUNDS(T) msdcn_plane_backward_kernel(const MsdcnParams<T, F, A> p, T* __restrict__ gvalue,
                                                                             PlaneLayout lay) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* vpl = reinterpret_cast<T*>(smem_raw + lay.vpl);
  T* opl = reinterpret_cast<T*>(smem_raw + lay.opl);
  A* ply = reinterpret_cast<A*>(smem_raw + lay.ptw);
  A* pwx = reinterpret_cast<A*>(smem_raw + lay.pwx);
  unsigned short* pinfo = reinterpret_cast<unsigned short*>(smem_raw + lay.pinfo);
  unsigned short* ent = reinterpret_cast<unsigned short*>(smem_raw + lay.ent);
  int* cstart = reinterpret_cast<int*>(smem_raw + lay.cstart);
  int* ccur = reinterpret_cast<int*>(smem_raw + lay.ccur);
  A* red = reinterpret_cast<A*>(smem_raw + lay.red);
  const int g = static_cast<int>(blockIdx.x % p.G);
  const int64_t b = blockIdx.x / p.G;
  // 32-bit index math inside the image (its planes fit in shared memory); 64-bit for global offsets
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W), HW = H * W, W1 = W + 1;
  const int K = p.K, C = p.C, rs = lay.rs, ys = lay.ys, L = C / kVec;
  const int rsu = rs * static_cast<int>(sizeof(T)) / 16;  // a plane row in 16-byte units
  const int P = HW * K, cells = (H + 1) * W1;
  const int64_t GC = static_cast<int64_t>(p.G) * C;
  const int tid = threadIdx.x, nthr = blockDim.x;

  // 1. planes in flight while the geometry is computed
  plane_load(vpl, rs, ys, p.value + b * HW * p.vs + g * C, p.vs, HW, lay.units, lay.W);
  plane_load(opl, rs, W * rs, p.gout + b * HW * GC + g * C, GC, HW, lay.units, lay.W);  // (b * HW: int64)
  plane_zero_row(vpl, rs, H * ys);
  for (int c = tid; c < cells; c += nthr) ccur[c] = 0;
  __syncthreads();

  // 2. geometry: each point's cell and inside-mask, counts
  for (int i = tid; i < P; i += nthr) {
    const int q = fdiv(i, lay.K), k = i - q * K;
    FieldIdx fi;
    const Corners<A> c = plane_point<FUSED>(p, lay, b, g, q, k, fi);
    unsigned short info = kNoCell;
    if (c.any) {
      const int cell = static_cast<int>(c.yi + 1) * W1 + static_cast<int>(c.xi) + 1;
      int mask = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) mask |= c.ok[j] ? 1 << j : 0;
      info = static_cast<unsigned short>(cell | (mask << 12));
      atomicAdd(ccur + cell, 1);
    }
    pinfo[i] = info;
  }
  copy_async_wait();
  __syncthreads();

  // 3. exclusive scan of the counts (warp 0: a run of cells per lane, then a shuffle scan of the runs)
  if (tid < 32) {
    const int per = (cells + 31) / 32, c0 = min(tid * per, cells), c1 = min(c0 + per, cells);
    int s = 0;
    for (int c = c0; c < c1; ++c) s += ccur[c];
    int incl = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (tid >= o) incl += v;
    }
    int run = incl - s;
    for (int c = c0; c < c1; ++c) {
      const int n = ccur[c];
      cstart[c] = run;
      ccur[c] = run;
      run += n;
    }
    if (tid == 31) cstart[cells] = incl;
  }
  __syncthreads();

  // 4. entries, corner dots, field grads
  A s0_acc = A(0);
  for (int i = tid; i < P; i += nthr) {
    const int info = pinfo[i];
    const int q = fdiv(i, lay.K), k = i - q * K;
    A D[4] = {A(0), A(0), A(0), A(0)};
    if (info != kNoCell && !(lay.diag & 2)) {
      const int cell = info & 0xfff, mask = info >> 12;
      const int y0 = fdiv(cell, lay.W1) - 1, x0 = cell - (y0 + 1) * W1 - 1;
      const SAddr orow = saddr(opl + q * rs);
      SAddr vrow[4];  // corners outside the grid read the zero row (their sums are reset below): no branches in the loop
#pragma unroll
      for (int j = 0; j < 4; ++j) vrow[j] = saddr(vpl + ((mask >> j) & 1 ? (y0 + (j >> 1)) * ys + (x0 + (j & 1)) * rs : H * ys));
      const int ub = kVec * static_cast<int>(sizeof(T));  // bytes per 8 channels
      for (int u = 0; u < L; ++u) {
        A o[kVec];
        lds8_at(orow + u * ub, opl, o);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          A v[kVec];
          lds8_at(vrow[j] + u * ub, vpl, v);
#pragma unroll
          for (int e = 0; e < kVec; ++e) D[j] += v[e] * o[e];
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) D[j] = (mask >> j) & 1 ? D[j] : A(0);  // exactly 0, even where grad_out is not finite
    }
    FieldIdx fi;
    const Corners<A> c = plane_point<FUSED>(p, lay, b, g, q, k, fi);
    if (info != kNoCell) {
      // the point's entry in its cell's list: the pull reads an entry's query and weight factors at the entry's own
      // index, so its loads do not wait on the entry (a point index) as a list of point indices would make them
      const int e = atomicAdd(ccur + (info & 0xfff), 1);
      ent[e] = static_cast<unsigned short>(q * rsu);
      // the x factors of w * bil_j, the pixel's side chosen by the pull per cell (corners() keeps lx as d bil_3 / d py,
      // -(1 - lx) as d bil_0 / d py and ly as d bil_3 / d px): one load and one or two float ops per entry in the pull,
      // where (w, lx, ly) took two loads and two to four
      const A w = to_acc(p.weight[fi.f], A());
      sts2(pwx + 2 * e, w * -c.ddy[0], w * c.ddy[3]);
      ply[e] = c.ddx[3];
    }
    s0_acc += lay.diag & 4 ? D[0] + D[1] + D[2] + D[3] : point_field_grads<FUSED>(p, fi, g, k, c, D);
  }
  __syncthreads();

  // 4b. each entry as one 16-byte record (w * (1 - lx), w * lx, ly, its grad_out row as the bits of an A) in the value
  // plane's space, dead after the dots. Why: every lane of the pull loads each entry's metadata, and three scalar
  // loads (ent, ly, one x factor) were 3 of the 8 shared-memory wavefronts per warp and entry (4 pixels); one 16-byte
  // load is 1. The pull was bound by those wavefronts: a cut of its instructions by 8 % left its time unchanged
  // (H200, XL 16^2).
  A* rec = reinterpret_cast<A*>(smem_raw + lay.vpl);
  const int entries = cstart[cells];
  for (int e = tid; e < entries; e += nthr) {
    A r4[4];
    lds2(pwx + 2 * e, r4[0], r4[1]);
    r4[2] = ply[e];
    r4[3] = int_bits(ent[e], A());
    store4(rec + 4 * e, r4);
  }
  __syncthreads();

  // 5. grad_value: per (pair of pixels (x0, y), (x0 + 1, y) with x0 even, 8 channels; plane_split), the entries of the
  //    cells they are corners of: the 3 cells from x0 - 1 to x0 + 1 in the cell rows y and y - 1. A cell's entry is read
  //    once per pair holding one of its corners: twice when its lower x is even (both corners of a row in one pair),
  //    else 4 times; 3 on average where one task per pixel read it 4 times (once per corner). Why: the pull is bound by
  //    shared-memory wavefronts (each entry read is a record and a grad_out row), not by its multiply-adds.
  const int pairs_w = lay.W2.d;  // pairs per row, (W + 1) / 2
  const int tasks = lay.diag & 1 ? 0 : H * pairs_w * lay.lanes.d;
  for (int t = tid; t < tasks; t += nthr) {
    const int pr = fdiv(t, lay.lanes), u = t - pr * lay.lanes.d;
    const bool split = lay.split && u >= lay.lanes.d - 8;  // also channel (L - 1) * 8 + u % 8
    const int y = fdiv(pr, lay.W2), x0 = 2 * (pr - y * pairs_w);
    const bool has_b = x0 + 1 < W;  // odd W: the last pair has one pixel
    const SAddr olane = saddr(opl + u * kVec), xlane = saddr(opl + (L - 1) * kVec + (u & 7));
    A acc_a[kVec], acc_b[kVec], accx_a = A(0), accx_b = A(0);
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc_a[e] = acc_b[e] = A(0);
    // cell (x0 + DX, y - DY): pixel a = (x0, y) is its corner with x offset -DX (DX <= 0), pixel b = (x0 + 1, y) the one
    // with x offset 1 - DX (DX >= 0); both have y offset DY. x factor: w * (1 - lx) at offset 0, w * lx at offset 1 (the
    // record's first two); y factor: 1 - ly at offset 0, ly at 1.
    auto pull_cell = [&](auto dx_c, auto dy_c) {
      constexpr int DX = decltype(dx_c)::value, DY = decltype(dy_c)::value;
      const int cell = (y - DY + 1) * W1 + x0 + DX + 1;
      const int e1 = cstart[cell + 1];
      for (int e = cstart[cell]; e < e1; ++e) {
        A rc[4];
        lds4(rec + 4 * e, rc);
        const A fy = DY ? rc[2] : A(1) - rc[2];
        const int r = bits_int(rc[3]);
        A o[kVec];
        lds8_at(olane + 16 * r, opl, o);
        const A ox = split ? lds1_at(xlane + 16 * r, opl) : A(0);
        if (DX <= 0) {
          const A w = rc[DX == 0 ? 0 : 1] * fy;
#pragma unroll
          for (int m = 0; m < kVec; ++m) acc_a[m] += w * o[m];
          if (split) accx_a += w * ox;
        }
        if (DX >= 0) {
          const A w = rc[DX == 0 ? 1 : 0] * fy;
#pragma unroll
          for (int m = 0; m < kVec; ++m) acc_b[m] += w * o[m];
          if (split) accx_b += w * ox;
        }
      }
    };
    using I0 = std::integral_constant<int, 0>;
    using I1 = std::integral_constant<int, 1>;
    using Im1 = std::integral_constant<int, -1>;
    pull_cell(Im1(), I0());
    pull_cell(I0(), I0());
    pull_cell(Im1(), I1());
    pull_cell(I0(), I1());
    if (has_b) {
      pull_cell(I1(), I0());
      pull_cell(I1(), I1());
    }
    T* gv = gvalue + (b * HW + y * W + x0) * p.vs + g * C;  // b int64
    store8(gv + u * kVec, acc_a);
    if (split) from_acc(accx_a, gv + (L - 1) * kVec + (u & 7));
    if (has_b) {
      gv += p.vs;
      store8(gv + u * kVec, acc_b);
      if (split) from_acc(accx_b, gv + (L - 1) * kVec + (u & 7));
    }
  }

  // 6. d/ds0 of the block, in a fixed order
  if (FUSED) {
    const A s = block_sum_ordered(s0_acc, red);
    if (tid == 0) p.s0_part[static_cast<int64_t>(g) * (gridDim.x / p.G) + b] = s;  // [G, B]
  }
}

// ---------------------------------------------------------------- forward
// grid: B * G blocks, block = b * G + g; out contiguous [N, G, C]. SPLIT = lay.split (plane_kernel_forward picks the
// instance): there every lane loads and sums a channel of the last unit, and only the split lanes store it, so the
// corner loop has no predicate. Why: with a runtime predicate under the 32-register cap nvcc rematerialised the
// predicate and the last unit's lane address at every corner (32.5 instructions per corner and lane at C = 72, 29
// without; sm_90 SASS).
template <typename T, typename F, typename A, bool FUSED, bool SPLIT>
__global__ void __launch_bounds__(kPlaneMaxThreads, plane_forward_min_blocks<T>()) msdcn_plane_forward_kernel(const MsdcnParams<T, F, A> p, PlaneLayout lay) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* vpl = reinterpret_cast<T*>(smem_raw + lay.vpl);
  A* ptw = reinterpret_cast<A*>(smem_raw + lay.ptw);
  uint2* pinfo = reinterpret_cast<uint2*>(smem_raw + lay.pinfo);
  const int g = static_cast<int>(blockIdx.x % p.G);
  const int64_t b = blockIdx.x / p.G;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W), HW = H * W;  // 32-bit inside the image
  const int K = p.K, C = p.C, rs = lay.rs, L = C / kVec;
  const int rsu = rs * static_cast<int>(sizeof(T)) / 16;          // a pixel's row in 16-byte units
  const int ysu = lay.ys * static_cast<int>(sizeof(T)) / 16, zr = H * ysu;  // an image row; the zero row
  const int P = HW * K;
  const int64_t GC = static_cast<int64_t>(p.G) * C;
  const int tid = threadIdx.x, nthr = blockDim.x;

  plane_load(vpl, rs, lay.ys, p.value + b * HW * p.vs + g * C, p.vs, HW, lay.units, lay.W);
  plane_zero_row(vpl, rs, H * lay.ys);
  for (int i = tid; i < P; i += nthr) {
    const int q = fdiv(i, lay.K), k = i - q * K;
    FieldIdx fi;
    const Corners<A> c = plane_point<FUSED>(p, lay, b, g, q, k, fi);
    const A wk = to_acc(p.weight[fi.f], A());
    unsigned r[4] = {unsigned(zr), unsigned(zr), unsigned(zr), unsigned(zr)};
    A cw[4] = {A(0), A(0), A(0), A(0)};
    if (c.any) {
      const int r00 = static_cast<int>(c.yi) * ysu + static_cast<int>(c.xi) * rsu;  // may be negative: only inside corners are used
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (c.ok[j]) {
          r[j] = static_cast<unsigned>(r00 + ((j & 1) ? rsu : 0) + ((j >> 1) ? ysu : 0));
          cw[j] = wk * c.bil[j];
        }
      }
    }
    pinfo[i] = make_uint2(r[0] | r[1] << 16, r[2] | r[3] << 16);
    store4(ptw + 4 * i, cw);
  }
  copy_async_wait();
  __syncthreads();

  const int tasks = HW * lay.lanes.d;
  for (int t = tid; t < tasks; t += nthr) {
    const int q = fdiv(t, lay.lanes), u = t - q * lay.lanes.d;
    const bool split = SPLIT && u >= lay.lanes.d - 8;  // also channel (L - 1) * 8 + u % 8
    const SAddr vlane = saddr(vpl + u * kVec), xlane = saddr(vpl + (L - 1) * kVec + (u & 7));
    A acc[kVec], accx = A(0);
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = A(0);
    for (int k = 0; k < K; ++k) {
      const uint2 e = pinfo[q * K + k];
      const int r[4] = {static_cast<int>(e.x & 0xffffu), static_cast<int>(e.x >> 16), static_cast<int>(e.y & 0xffffu),
                        static_cast<int>(e.y >> 16)};
      A cw[4];
      lds4(ptw + 4 * (q * K + k), cw);
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // corners outside the grid: weight 0 on the zero row, no branch
        A v[kVec];
        lds8_at(vlane + 16 * r[j], vpl, v);
#pragma unroll
        for (int m = 0; m < kVec; ++m) acc[m] += cw[j] * v[m];
        if (SPLIT) accx += cw[j] * lds1_at(xlane + 16 * r[j], vpl);  // used where split
      }
    }
    T* out = p.out + (b * HW + q) * GC + g * C;
    store8(out + u * kVec, acc);
    if (split) from_acc(accx, out + (L - 1) * kVec + (u & 7));
  }
}

// The plane forward's instance for a launch (its SPLIT is lay.split).
template <typename T, typename F, typename A>
auto plane_kernel_forward(bool fused, const PlaneLayout& lay) {
  return fused ? (lay.split ? msdcn_plane_forward_kernel<T, F, A, true, true> : msdcn_plane_forward_kernel<T, F, A, true, false>)
               : (lay.split ? msdcn_plane_forward_kernel<T, F, A, false, true> : msdcn_plane_forward_kernel<T, F, A, false, false>);
}

}  // namespace flowdcn
