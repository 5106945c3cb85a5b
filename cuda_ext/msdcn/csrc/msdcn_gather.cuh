// Gather ("pull") MSDCN backward: grad_value summed per pixel from a list of its contributions, no float atomics.
//
// The scatter backward (msdcn_backward_kernel) adds every (query, point, corner) contribution
// w * bil * grad_out[query] to an fp32 grad_value buffer with global atomics: N*G*K*4*C*4 bytes of atomic
// payload (5.4 GB at XL 32^2), which bounds it by L2 atomic throughput, and it gathers the four corners'
// values a second time for the dots <value[corner], grad_out[query]> that the field grads need.
// Here the sampling points are first bucketed by the grid cell they fall in (a counting sort on (cell, group);
// cell = the lower corner (x0, y0), so x0, y0 in [-1, W-1] x [-1, H-1]), then one pass over the pixels does both
// jobs: pixel p is corner j of the cells (x - j&1, y - j>>1), and for every point of those four cells it gathers
// grad_out[query] once, adds w * bil_j * grad_out into registers (grad_value[p] is written once, in the value's
// dtype: no zero-fill, no fp32 buffer, no cast) and takes the dot with value[p], which sits in registers for the
// whole pixel. The backward then reads grad_out as the forward reads value. Bucketing points rather than their
// four corners takes one integer atomic per point and writes one entry per point.
//
//   1. count:    per (query, group, point) item: geometry; rank = atomicAdd(count[cell, group], 1); key and
//                rank are stored. The training forward of the packed op does this itself (MsdcnParams::bucket_count)
//                and keeps count, key and rank for the backward, which then starts at 2.
//   2. scan:     start = exclusive prefix sum of count (the host launcher, at::cumsum).
//   3. fill:     entry e = start[key] + rank: the item's grad_out row (query, group) and w * bil of its 4 corners;
//                pos[item] = e.
//   4. pull:     per (pixel, group), C / (8 V) lanes of V runs of 8 channels: grad_value and the corner dots,
//                stored by entry (consecutive lanes of a walk write neighbouring dots).
//   5. epilogue: per item: its entry (pos) and the chain rule of the field grads from the entry's
//                dots of corners inside the grid (as the scatter kernel's phase 2), d/ds0 reduced per block in a
//                fixed order.
// Entries inside a bucket follow the counting's atomic order, so grad_value's fp32 sums have no fixed
// order (like the scatter kernel's); every other grad is computed in a fixed order.
// The stored key alone decides where an entry goes and which corners are inside the grid (the pull visits and
// writes the dots of exactly those, the fill and the epilogue give the others weight and dot 0), so the fill and
// epilogue kernels, which recompute the geometry for the weights, can never disagree with the counting about an
// index or a corner; and every kernel computes the sample position with the same unfused roundings (add_rn, mul_rn),
// so the recomputed weights belong to the stored cell.
#pragma once

#include "msdcn_kernels.cuh"

namespace flowdcn {

constexpr int kGatherThreads = 256;  // threads per block of the gather-backward kernels

// Threads of an epilogue block: whole queries (a multiple of G*K), about kGatherThreads.
inline int gather_epilogue_threads(int G, int K) {
  const int per_query = G * K;
  return per_query * (per_query < kGatherThreads ? kGatherThreads / per_query : 1);
}

// Buckets: one per (cell, group), cell (x0, y0) of image b at ((b * (H + 1) + y0 + 1) * (W + 1) + x0 + 1).
inline int64_t gather_buckets(int64_t B, int64_t H, int64_t W, int64_t G) { return B * (H + 1) * (W + 1) * G; }

template <typename T, typename A>
struct GatherBufs {
  int* count;   // [NB] zeroed: points per (cell, group) bucket, NB = gather_buckets(...)
  int* key;     // [items]: bucket of each item (query, group, point), -1 when no corner is inside the grid
  int* rank;    // [items]: position of the item inside its bucket
  int* start;   // [NB + 1] exclusive prefix sum of count (start[0] zeroed by the launcher)
  int* row;     // [items]: grad_out row (query, group) of each entry (entries sorted by bucket; the first start[NB] used)
  int* pos;     // [items]: the item's entry, start[key] + rank (written by the fill; the epilogue reads it coalesced)
  A* cw;        // [items, 4]: w_k * bilinear weight of each entry's corners (0 outside the grid)
  A* dots;      // [items, 4]: <value[corner], grad_out[query]> over C of each entry's corners (unwritten outside the grid)
  T* gvalue;    // [N, G, C] grad_value in the value's dtype, pixel n at n * vs (the value's layout)
  A* s0_part;   // FUSED: [G, blocks of the epilogue] per-block sums of d/ds0
};

// The backward's workspaces, shared by the launchers and the emulation harness: the bucketing, int32 [count NB | key items |
// rank items] (count zeroed; written by the count kernel, or kept from the training forward), the rest of the int32
// workspace [start NB + 1 | row items | pos items] (start[0] zeroed) and A [cw 4 items | dots 4 items].
inline int64_t gather_count_words(int64_t NB, int64_t items) { return NB + 2 * items; }
inline int64_t gather_int_words(int64_t NB, int64_t items) { return (NB + 1) + 2 * items; }
inline int64_t gather_float_words(int64_t items) { return 8 * items; }
template <typename T, typename A>
GatherBufs<T, A> gather_bind(int* counts, int* ints, A* floats, int64_t NB, int64_t items) {
  GatherBufs<T, A> b{};
  b.count = counts;
  b.key = b.count + NB;
  b.rank = b.key + items;
  b.start = ints;
  b.row = b.start + NB + 1;
  b.pos = b.row + items;
  b.cw = floats;
  b.dots = b.cw + 4 * items;
  return b;
}

// Item i = (n * G + g) * K + k (the fields' layout) -> its query coordinates, group and point.
struct ItemPos {
  int64_t n, b, h, w;  // query pixel n = (b * H + h) * W + w
  int g, k;
};
template <typename T, typename F, typename A>
__device__ __forceinline__ ItemPos item_pos(const MsdcnParams<T, F, A>& p, int64_t i) {
  ItemPos r;
  r.k = static_cast<int>(i % p.K);
  const int64_t ng = i / p.K;
  r.g = static_cast<int>(ng % p.G);
  r.n = ng / p.G;
  r.w = r.n % p.W;
  r.h = (r.n / p.W) % p.H;
  r.b = r.n / (p.H * p.W);
  return r;
}

template <bool FUSED, typename T, typename F, typename A>
__device__ __forceinline__ Corners<A> item_corners(const MsdcnParams<T, F, A>& p, const ItemPos& q) {
  A ox, oy;
  point_offset<FUSED>(p, field_idx(p, q.n, q.g, q.k), q.g, q.k, ox, oy);
  return corners(add_rn(A(q.w), ox), add_rn(A(q.h), oy), q.b, p.H, p.W, p.trunc);
}

// Corners of bucket `key`'s cell that lie inside the grid, bit j for corner (x0 + (j&1), y0 + (j>>1)). The fill and
// the epilogue both take it from the stored key (never from recomputed coordinates), as the pull's walk does.
template <typename T, typename F, typename A>
__device__ __forceinline__ unsigned cell_inside(const MsdcnParams<T, F, A>& p, int key) {
  const int64_t cell = key / p.G;
  const int64_t x0 = cell % (p.W + 1) - 1, y0 = (cell / (p.W + 1)) % (p.H + 1) - 1;
  unsigned m = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t x = x0 + (j & 1), y = y0 + (j >> 1);
    m |= (x >= 0 && x < p.W && y >= 0 && y < p.H) ? (1u << j) : 0u;
  }
  return m;
}

// 1. count: one thread per item.
template <typename T, typename F, typename A, bool FUSED>
__global__ void __launch_bounds__(kGatherThreads) msdcn_gather_count_kernel(const MsdcnParams<T, F, A> p, GatherBufs<T, A> b) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.N * p.G * p.K) return;
  const ItemPos q = item_pos(p, i);
  const Corners<A> c = item_corners<FUSED>(p, q);
  int key = -1, rank = 0;
  if (c.any) {  // the launcher checks that the bucket count fits in int32
    key = bucket_of(q.b, c.xi, c.yi, p.H, p.W, p.G, q.g);
    rank = atomicAdd(b.count + key, 1);
  }
  b.key[i] = key;
  b.rank[i] = rank;
}

// 3. fill: one thread per item with a bucket; places its entry (grad_out row, corner weights). The entry's dots are
// written by the pull for its corners inside the grid; the others are never written, and the epilogue ignores them.
template <typename T, typename F, typename A, bool FUSED>
__global__ void __launch_bounds__(kGatherThreads) msdcn_gather_fill_kernel(const MsdcnParams<T, F, A> p, GatherBufs<T, A> b) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.N * p.G * p.K) return;
  const int key = b.key[i];
  if (key < 0) return;
  const int64_t pos = __ldg(b.start + key) + b.rank[i];
  const unsigned inside = cell_inside(p, key);  // the corners the pull visits
  const ItemPos q = item_pos(p, i);
  const Corners<A> c = item_corners<FUSED>(p, q);
  const A wk = to_acc(p.weight[field_idx(p, q.n, q.g, q.k).f], A());
  A cw[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) cw[j] = (inside >> j) & 1 ? wk * c.bil[j] : A(0);
  store4(b.cw + 4 * pos, cw);
  b.row[pos] = static_cast<int>(i / p.K);  // < N * G < 2^29 (gather_serves: N * G * K * 4 < 2^31)
  b.pos[i] = static_cast<int>(pos);        // the epilogue reads it coalesced
}

// Pull geometry: a (pixel, group) row of C channels is served by C / (8 V) lanes, each owning V runs of 8 channels:
// run u of lane l at channels (u * lanes + l) * 8, so each 16-byte load instruction of a pixel's lanes covers one
// contiguous span. More runs per lane spread a walk entry's fixed cost (entry loads, address, loop, dot slot) over
// more channels and leave fewer lanes of a warp idle (C = 72: V = 3 -> 10 pixels of 3 lanes use 30 of 32 lanes,
// V = 1 -> 3 pixels of 9 lanes use 27), for 2 x 8 V accumulator registers.
constexpr int kPullMaxRuns = 4;
// Runs per lane: requested (1..4, must divide C/8), or 0 = automatic: the first of 3, 4, 2, 1 dividing C/8 (1 for fp64
// accumulation, whose registers are twice as wide). Measured on an H200 (bench/RESULTS.md): XL (C = 72) pull 0.77 ms
// with 3 vs 1.00 with 1 at 32²; B (C = 64) 0.45 with 4, 0.46 with 2, 0.57 with 1.
inline int pull_runs(int C, size_t acc_bytes, int requested) {
  const int L = C / kVec;
  if (requested > 0) return requested;
  if (acc_bytes > 4) return 1;
  return L % 3 == 0 ? 3 : L % 4 == 0 ? 4 : L % 2 == 0 ? 2 : 1;
}
inline int pull_lanes(int C, int V) { return C / (kVec * V); }
// (pixel, group) pairs of a pull block of kGatherThreads threads.
inline int pull_per_block(int C, int V) { return (kGatherThreads / 32) * (32 / pull_lanes(C, V)); }
// Shared memory of a pull block: a slab of lanes^2 + 1 values per (pixel, group).
inline size_t pull_smem_bytes(int C, int V, size_t acc_bytes) {
  const int lanes = pull_lanes(C, V);
  return static_cast<size_t>(pull_per_block(C, V)) * (lanes * lanes + 1) * acc_bytes;
}
// Blocks of a pull launch. group_major: block b serves group b % G for a run of consecutive pixels.
inline int64_t pull_blocks(int64_t N, int G, int C, int V, bool group_major) {
  const int per_block = pull_per_block(C, V);
  return group_major ? (N + per_block - 1) / per_block * G : (N * G + per_block - 1) / per_block;
}

// 4. pull: `lanes` = C / (8 V) lanes per (pixel, group), 32 / lanes of them per warp (lanes beyond them idle).
// Pixel (x, y) is corner j of cell (x - (j&1), y - (j>>1)); the four cells' lists are walked as one.
// Walks differ in length, so each warp runs to its longest and the shorter ones idle.
// group_major: block b serves group b % G for a run of consecutive pixels, so the cells and grad_out rows it
// reads (queries near those pixels, one group) are shared between its lanes; otherwise a block serves
// consecutive (pixel, group) pairs (a pixel or two, all groups).
// Corner dots: a batch of `lanes` entries of the walk, each lane writes its partial dot of each to shared memory,
// then lane l sums entry l's partials (one store and one load per lane and entry, instead of a shuffle tree per
// entry) and stores the dot at the entry (consecutive entries of a list: neighbouring addresses).
// V = 3 (C = 72) with fp32 accumulation is capped at 85 registers, 3 blocks per SM instead of 2 (104 registers
// uncapped): a few spilled registers (80 bytes), 4-5 % faster at XL 32² and 64² on an H200 (bench/RESULTS.md). fp64
// needs twice the registers: no cap.
template <typename T, typename A, int V>
__global__ void __launch_bounds__(kGatherThreads, V == 3 && sizeof(A) == 4 ? 3 : 1) msdcn_gather_pull_kernel(const T* __restrict__ value, const T* __restrict__ gout,
                                                                          GatherBufs<T, A> b, int64_t N, int64_t H, int64_t W, int G,
                                                                          int C, int64_t vs, bool group_major) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lanes = C / (kVec * V);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int per_warp = 32 / lanes;
  const int seg = lane / lanes, sl = lane - seg * lanes;
  const int64_t slot = static_cast<int64_t>(warp) * per_warp + seg;  // (pixel, group) of this lane within the block
  const int64_t per_block = static_cast<int64_t>(blockDim.x >> 5) * per_warp;
  int64_t pixel;
  int g;
  if (group_major) {
    pixel = (blockIdx.x / G) * per_block + slot;
    g = blockIdx.x % G;
  } else {
    const int64_t pg = blockIdx.x * per_block + slot;
    pixel = pg / G;
    g = static_cast<int>(pg % G);
  }
  const bool mine = seg < per_warp && pixel < N;
  const int64_t x = pixel % W, y = (pixel / W) % H, bimg = pixel / (H * W);
  const int64_t ch = pixel * vs + g * C + sl * kVec;  // this lane's first run of the (pixel, group) row (value, grad_value)
  const int run = lanes * kVec;                        // channels between a lane's runs
  A v[V][kVec], acc[V][kVec];
#pragma unroll
  for (int u = 0; u < V; ++u)
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      v[u][i] = A(0);
      acc[u][i] = A(0);
    }
  if (mine) {
#pragma unroll
    for (int u = 0; u < V; ++u) load8(value + ch + u * run, v[u]);
  }
  A* red = reinterpret_cast<A*>(smem_raw) + (warp * per_warp + min(seg, per_warp - 1)) * (lanes * lanes + 1);
  // The four cells' lists, walked as one: (b0, c0) is the list being read (its next entry and how many are
  // left), j its corner; the others queue behind it in plain registers (no indexed arrays: no local memory).
  int b0 = 0, c0 = 0, b1 = 0, c1 = 0, b2 = 0, c2 = 0, b3 = 0, c3 = 0;
  if (mine) {  // cell (x - (j&1), y - (j>>1)): its bucket always exists (cells start at -1)
    const int64_t k00 = ((bimg * (H + 1) + y + 1) * (W + 1) + x + 1) * G + g, row = (W + 1) * G;
    b0 = b.start[k00];
    c0 = b.start[k00 + 1] - b0;
    b1 = b.start[k00 - G];
    c1 = b.start[k00 - G + 1] - b1;
    b2 = b.start[k00 - row];
    c2 = b.start[k00 - row + 1] - b2;
    b3 = b.start[k00 - row - G];
    c3 = b.start[k00 - row - G + 1] - b3;
  }
  const int total = c0 + c1 + c2 + c3;
  int trip = total;  // the warp's longest walk
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) trip = max(trip, __shfl_xor_sync(0xffffffffu, trip, o));
  int j = 0, done = 0;
  for (int base = 0; base < trip; base += lanes) {
    int64_t my_dot = -1;  // dot slot of entry base + sl, which this lane sums
    for (int u = 0; u < lanes && base + u < trip; ++u) {
      A d = A(0);
      if (done < total) {
        while (c0 == 0) {  // next non-empty list
          b0 = b1; c0 = c1; b1 = b2; c1 = c2; b2 = b3; c2 = c3; c3 = 0;
          ++j;
        }
        const int64_t e = b0++;
        --c0;
        ++done;
        const A w = b.cw[4 * e + j];
        if (u == sl) my_dot = 4 * e + j;
        const T* src = gout + static_cast<int64_t>(b.row[e]) * C + sl * kVec;
        A go[V][kVec];
#pragma unroll
        for (int r = 0; r < V; ++r) load8(src + r * run, go[r]);  // all V loads in flight before the math
#pragma unroll
        for (int r = 0; r < V; ++r)
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            d += v[r][i] * go[r][i];
            acc[r][i] += w * go[r][i];
          }
      }
      if (seg < per_warp) red[u * lanes + sl] = d;
    }
    __syncwarp();
    if (my_dot >= 0) {
      A s = A(0);
      for (int l = 0; l < lanes; ++l) s += red[sl * lanes + l];
      b.dots[my_dot] = s;
    }
    __syncwarp();  // the slab is rewritten by the next batch
  }
  if (mine) {
#pragma unroll
    for (int u = 0; u < V; ++u) store8(b.gvalue + ch + u * run, acc[u]);
  }
}

// The pull kernel with V runs per lane (V in 1..kPullMaxRuns).
template <typename T, typename A>
using PullKernel = void (*)(const T*, const T*, GatherBufs<T, A>, int64_t, int64_t, int64_t, int, int, int64_t, bool);
template <typename T, typename A>
PullKernel<T, A> pull_kernel(int V) {
  switch (V) {
    case 1: return msdcn_gather_pull_kernel<T, A, 1>;
    case 2: return msdcn_gather_pull_kernel<T, A, 2>;
    case 3: return msdcn_gather_pull_kernel<T, A, 3>;
    default: return msdcn_gather_pull_kernel<T, A, 4>;
  }
}

// 5. epilogue: one thread per item, as the fields are laid out (coalesced loads and stores of the fields; the
// entry's dots are one 16-byte load). blockDim is a multiple of G*K, so a block holds whole queries and thread tid
// serves group (tid / K) % G; d/ds0 is summed over the block's items in a fixed order.
template <typename T, typename F, typename A, bool FUSED>
__global__ void __launch_bounds__(1024) msdcn_gather_epilogue_kernel(const MsdcnParams<T, F, A> p, GatherBufs<T, A> b) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* red = reinterpret_cast<A*>(smem_raw);  // [blockDim.x]
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  A gl = A(0);
  if (i < p.N * p.G * p.K) {
    const ItemPos q = item_pos(p, i);
    A D[4] = {A(0), A(0), A(0), A(0)};  // corner dots; 0 for corners outside the grid, and for items without a bucket
    const int key = b.key[i];
    if (key >= 0) {
      A e[4];
      load4(b.dots + 4 * static_cast<int64_t>(b.pos[i]), e);
      const unsigned inside = cell_inside(p, key);
#pragma unroll
      for (int j = 0; j < 4; ++j) D[j] = (inside >> j) & 1 ? e[j] : A(0);  // a select: outside dots were never written
    }
    const Corners<A> c = item_corners<FUSED>(p, q);
    gl = point_field_grads<FUSED>(p, field_idx(p, q.n, q.g, q.k), q.g, q.k, c, D);
  }
  if (FUSED) {
    red[threadIdx.x] = gl;
    __syncthreads();
    if (threadIdx.x < p.G) {
      const int per_query = p.G * p.K;
      A s = A(0);
      for (int q = 0; q < static_cast<int>(blockDim.x) / per_query; ++q)
        for (int kk = 0; kk < p.K; ++kk) s += red[q * per_query + threadIdx.x * p.K + kk];
      b.s0_part[static_cast<int64_t>(threadIdx.x) * gridDim.x + blockIdx.x] = s;  // [G, blocks]: rows summed contiguously
    }
  }
}

}  // namespace flowdcn
