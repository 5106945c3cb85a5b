// Gather ("pull") MSDCN backward: grad_value summed per pixel from a list of its contributions, no float atomics.
//
// The scatter backward (msdcn_backward_kernel) adds every (query, point, corner) contribution
// w * bil * grad_out[query] to an fp32 grad_value buffer with global atomics: N*G*K*4*C*4 bytes of atomic
// payload (5.4 GB at XL 32^2), which bounds it by L2 atomic throughput, and it gathers the four corners'
// values a second time for the dots <value[corner], grad_out[query]> that the field grads need.
// Here the contributions are first bucketed by the pixel they land on (a counting sort on (pixel, group)),
// then one pass over the buckets does both jobs: for every contribution of pixel p it gathers
// grad_out[query] once, adds w * bil * grad_out into registers (grad_value[p] is written once, in the
// value's dtype: no zero-fill, no fp32 buffer, no cast) and takes the dot with value[p], which sits in
// registers for the whole bucket. The backward then reads grad_out as the forward reads value.
//
//   1. count:    per (query, group, point): geometry; per valid corner, rank = atomicAdd(count[pixel, group], 1)
//                (integer atomics, one per corner instead of C/4 float4 atomics); key and rank are stored.
//   2. scan:     start = exclusive prefix sum of count (the host launcher, at::cumsum).
//   3. fill:     entries[start[key] + rank] = (corner index, w * bil); corners outside the grid get dot = 0.
//   4. pull:     per (pixel, group) bucket, L = C/8 lanes of 8 channels: grad_value and the corner dots.
//   5. epilogue: per (query, group): the chain rule of the field grads from the four corner dots (as the
//                scatter kernel's phase 2), d/ds0 reduced per block in a fixed order.
// Indices inside a bucket follow the count kernel's atomic order, so grad_value's fp32 sums have no fixed
// order (like the scatter kernel's); every other grad is computed in a fixed order.
// The stored key decides where an entry goes and whether a dot is written, so the fill and epilogue
// kernels, which recompute the geometry, can never disagree with the count kernel about an index.
#pragma once

#include "msdcn_kernels.cuh"

namespace flowdcn {

constexpr int kGatherThreads = 256;  // threads per block of the gather-backward kernels

// One contribution of a bucket: the corner's flat index ((query * G + group) * K + point) * 4 + corner,
// which names both the grad_out row (index / (4K)) and the dot slot, and its weight w_k * bilinear.
template <typename A>
struct GatherEntry {
  int idx;
  int pad;
  A cw;
};
template <>
struct __align__(8) GatherEntry<float> {
  int idx;
  float cw;
};

// Magic m with idx / (4K) == (idx * m) >> 40 for every idx < 2^31 when 4K <= 256 (the rounding error idx / 2^40
// stays below 1 / (4K)); 0 = divide.
inline uint64_t gather_row_magic(int K) {
  const uint64_t d = 4 * static_cast<uint64_t>(K);
  return d <= 256 ? ((uint64_t(1) << 40) + d - 1) / d : 0;
}

// Threads of an epilogue block: whole queries (a multiple of G*K), about kGatherThreads.
inline int gather_epilogue_threads(int G, int K) {
  const int per_query = G * K;
  return per_query * (per_query < kGatherThreads ? kGatherThreads / per_query : 1);
}

template <typename T, typename A>
struct GatherBufs {
  int* count;              // [N*G] zeroed: contributions per (pixel, group) bucket
  int* start;              // [N*G + 1] exclusive prefix sum of count (start[0] is written by the count kernel)
  int* key;                // [E], E = N*G*K*4: bucket of each corner, -1 outside the grid
  int* rank;               // [E]: position of the corner inside its bucket
  GatherEntry<A>* entries; // [E] (the first start[N*G] are used)
  A* dots;                 // [E]: <value[corner], grad_out[query]> over C (0 for corners outside the grid)
  T* gvalue;               // [N, G, C] grad_value in the value's dtype
  A* s0_part;              // FUSED: [blocks of the epilogue, G] per-block sums of d/ds0
};

__device__ __forceinline__ void store_int4(int* p, const int* v) {
  *reinterpret_cast<int4*>(p) = make_int4(v[0], v[1], v[2], v[3]);
}

// 1. count: one thread per (query, group, point) item i = (n * G + g) * K + k (the fields' layout).
template <typename T, typename F, typename A, bool FUSED>
__global__ void __launch_bounds__(kGatherThreads) msdcn_gather_count_kernel(const MsdcnParams<T, F, A> p, GatherBufs<T, A> b) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i == 0) b.start[0] = 0;
  if (i >= p.N * p.G * p.K) return;
  const int k = static_cast<int>(i % p.K);
  const int64_t ng = i / p.K;
  const int g = static_cast<int>(ng % p.G);
  const int64_t n = ng / p.G;
  const int64_t w = n % p.W, h = (n / p.W) % p.H, bb = n / (p.H * p.W);
  A ox, oy;
  point_offset<FUSED>(p, i, g, k, ox, oy);
  const Corners<A> c = corners(A(w) + ox, A(h) + oy, bb, p.H, p.W, p.trunc);
  int key[4], rank[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    key[j] = -1;
    rank[j] = 0;
    if (c.any && c.ok[j]) {
      key[j] = static_cast<int>(c.row[j] * p.G + g);  // the launcher checks N * G < 2^31
      rank[j] = atomicAdd(b.count + key[j], 1);
    }
  }
  store_int4(b.key + 4 * i, key);
  store_int4(b.rank + 4 * i, rank);
}

// 3. fill: the same items; places each valid corner's entry, zeroes the dots of the others.
template <typename T, typename F, typename A, bool FUSED>
__global__ void __launch_bounds__(kGatherThreads) msdcn_gather_fill_kernel(const MsdcnParams<T, F, A> p, GatherBufs<T, A> b) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.N * p.G * p.K) return;
  const int k = static_cast<int>(i % p.K);
  const int64_t ng = i / p.K;
  const int g = static_cast<int>(ng % p.G);
  const int64_t n = ng / p.G;
  const int64_t w = n % p.W, h = (n / p.W) % p.H, bb = n / (p.H * p.W);
  A ox, oy;
  point_offset<FUSED>(p, i, g, k, ox, oy);
  const Corners<A> c = corners(A(w) + ox, A(h) + oy, bb, p.H, p.W, p.trunc);
  const A wk = to_acc(p.weight[i], A());
  const int4 key = *reinterpret_cast<const int4*>(b.key + 4 * i);
  const int4 rank = *reinterpret_cast<const int4*>(b.rank + 4 * i);
  const int keys[4] = {key.x, key.y, key.z, key.w}, ranks[4] = {rank.x, rank.y, rank.z, rank.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int idx = static_cast<int>(4 * i + j);  // the launcher checks N * G * K * 4 < 2^31
    if (keys[j] >= 0) {
      GatherEntry<A> e{};
      e.idx = idx;
      e.cw = wk * c.bil[j];
      b.entries[b.start[keys[j]] + ranks[j]] = e;
    } else {
      b.dots[idx] = A(0);
    }
  }
}

// 4. pull: L = C/8 lanes per (pixel, group) bucket, 32/L buckets per warp (lanes beyond them idle), each
// lane owns 8 channels. Buckets differ in length, so each warp runs to its longest bucket and the shorter
// ones idle (the dot reduction needs every lane of the warp).
// group_major: block b serves group b % G for a run of consecutive pixels, so the grad_out rows it gathers
// (queries near those pixels, one group) are shared between its buckets; otherwise a block serves
// consecutive buckets (a pixel or two, all groups).
template <typename T, typename A>
struct PullLane {
  int L, seg, sl, per_warp;
  bool mine;          // this lane serves a bucket
  int64_t ch;         // [N*G, C] offset of its 8 channels in the bucket's (pixel, group) row of value / grad_value
  int beg, cnt, trip; // the bucket's entries [beg, beg + cnt); trip = the longest bucket of the warp
  A v[kVec];          // value[pixel, group, its 8 channels]

  __device__ __forceinline__ PullLane(const T* value, const GatherBufs<T, A>& b, int64_t NG, int G, int C, bool group_major) {
    L = C / kVec;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    per_warp = 32 / L;
    seg = lane / L;
    sl = lane - seg * L;
    const int64_t slot = static_cast<int64_t>(warp) * per_warp + seg;  // bucket of this lane within the block
    const int64_t per_block = static_cast<int64_t>(blockDim.x >> 5) * per_warp;
    int64_t bucket;
    mine = seg < per_warp;
    if (group_major) {
      const int64_t pixel = (blockIdx.x / G) * per_block + slot;
      bucket = pixel * G + blockIdx.x % G;
      mine = mine && pixel < NG / G;
    } else {
      bucket = blockIdx.x * per_block + slot;
      mine = mine && bucket < NG;
    }
    beg = cnt = 0;
    if (mine) {
      beg = b.start[bucket];
      cnt = b.start[bucket + 1] - beg;
    }
    trip = cnt;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) trip = max(trip, __shfl_xor_sync(0xffffffffu, trip, o));
    ch = bucket * C + sl * kVec;
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = A(0);
    if (mine) load8(value + ch, v);
  }

  // grad_out[row of entry idx] for this lane's channels; row = idx / (4K), a multiply-shift when the launcher
  // found a magic (4K <= 256).
  __device__ __forceinline__ void load_gout(const T* gout, int idx, int K, int C, uint64_t row_magic, A* go) const {
    const int64_t row = row_magic ? static_cast<int64_t>((static_cast<uint64_t>(idx) * row_magic) >> 40) : idx / (4 * K);
    load8(gout + row * C + sl * kVec, go);
  }
};

// Dot reduction by shuffles: per contribution, a tree over the bucket's L lanes into its lane 0. U contributions
// per iteration: their grad_out loads are all in flight before the first is used.
template <typename T, typename A, int U>
__global__ void __launch_bounds__(kGatherThreads) msdcn_gather_pull_kernel(const T* __restrict__ value, const T* __restrict__ gout,
                                                                          GatherBufs<T, A> b, int64_t NG, int G, int C, int K,
                                                                          uint64_t row_magic, bool group_major) {
  PullLane<T, A> P(value, b, NG, G, C, group_major);
  A acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = A(0);
  for (int base = 0; base < P.trip; base += U) {
    int idx[U];
    A cw[U], go[U][kVec], d[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      idx[u] = -1;
      cw[u] = A(0);
      if (base + u < P.cnt) {
        const GatherEntry<A> e = b.entries[P.beg + base + u];
        idx[u] = e.idx;
        cw[u] = e.cw;
        P.load_gout(gout, e.idx, K, C, row_magic, go[u]);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) go[u][i] = A(0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      d[u] = A(0);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        d[u] += P.v[i] * go[u][i];
        acc[i] += cw[u] * go[u][i];
      }
    }
    // Sum the L lanes' partial dots into lane 0 of the bucket (a tree that stops at the bucket's edge).
    for (int o = 1; o < P.L; o <<= 1) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const A other = __shfl_down_sync(0xffffffffu, d[u], o);
        if (P.sl + o < P.L) d[u] += other;
      }
    }
    if (P.sl == 0) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (idx[u] >= 0) b.dots[idx[u]] = d[u];
    }
  }
  if (P.mine) store8(b.gvalue + P.ch, acc);
}

// Dot reduction through shared memory: a batch of L contributions per bucket, each lane writes its partial dot
// of each (one store per lane and contribution), then lane l sums contribution l's L partials (one load per
// lane and contribution) instead of log2(L) shuffle steps per contribution. Shared memory: a slab of L*L + 1
// values per bucket (pull_smem_bytes).
template <typename T, typename A>
__global__ void __launch_bounds__(kGatherThreads) msdcn_gather_pull_smem_kernel(const T* __restrict__ value, const T* __restrict__ gout,
                                                                               GatherBufs<T, A> b, int64_t NG, int G, int C, int K,
                                                                               uint64_t row_magic, bool group_major) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  PullLane<T, A> P(value, b, NG, G, C, group_major);
  const int L = P.L;
  A* red = reinterpret_cast<A*>(smem_raw) + ((threadIdx.x >> 5) * P.per_warp + min(P.seg, P.per_warp - 1)) * (L * L + 1);
  A acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = A(0);
  for (int base = 0; base < P.trip; base += L) {
    int my_idx = -1;  // entry base + sl, whose dot this lane sums
    for (int u = 0; u < L && base + u < P.trip; ++u) {
      A d = A(0);
      if (base + u < P.cnt) {
        const GatherEntry<A> e = b.entries[P.beg + base + u];
        if (u == P.sl) my_idx = e.idx;
        A go[kVec];
        P.load_gout(gout, e.idx, K, C, row_magic, go);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          d += P.v[i] * go[i];
          acc[i] += e.cw * go[i];
        }
      }
      if (P.seg < P.per_warp) red[u * L + P.sl] = d;
    }
    __syncwarp();
    if (my_idx >= 0) {
      A s = A(0);
      for (int l = 0; l < L; ++l) s += red[P.sl * L + l];
      b.dots[my_idx] = s;
    }
    __syncwarp();  // the slab is rewritten by the next batch
  }
  if (P.mine) store8(b.gvalue + P.ch, acc);
}

// Shared memory of a pull_smem block of kGatherThreads threads.
inline size_t pull_smem_bytes(int C, size_t acc_bytes) {
  const int L = C / kVec;
  return static_cast<size_t>(kGatherThreads / 32) * (32 / L) * (L * L + 1) * acc_bytes;
}

// 5. epilogue: one thread per (query, group, point) item i, as the fields are laid out (coalesced loads and
// stores). blockDim is a multiple of G*K, so a block holds whole queries and thread tid serves group
// (tid / K) % G; d/ds0 is summed over the block's items in a fixed order.
template <typename T, typename F, typename A, bool FUSED>
__global__ void __launch_bounds__(1024) msdcn_gather_epilogue_kernel(const MsdcnParams<T, F, A> p, GatherBufs<T, A> b) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* red = reinterpret_cast<A*>(smem_raw);  // [blockDim.x]
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int k = static_cast<int>(threadIdx.x % p.K), g = static_cast<int>((threadIdx.x / p.K) % p.G);
  A gl = A(0);
  if (i < p.N * p.G * p.K) {
    const int64_t n = i / (static_cast<int64_t>(p.G) * p.K);
    const int64_t w = n % p.W, h = (n / p.W) % p.H, bb = n / (p.H * p.W);
    A D[4];  // corner dots; 0 for corners outside the grid (fill kernel)
    load4(b.dots + 4 * i, D);
    A ox, oy;
    point_offset<FUSED>(p, i, g, k, ox, oy);
    const Corners<A> c = corners(A(w) + ox, A(h) + oy, bb, p.H, p.W, p.trunc);
    A sw = A(0), sx = A(0), sy = A(0);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sw += c.bil[j] * D[j];
      sx += c.ddx[j] * D[j];
      sy += c.ddy[j] * D[j];
    }
    const A wk = to_acc(p.weight[i], A());
    const A gox = wk * sx, goy = wk * sy;  // d loss / d offset (x, y)
    from_acc(sw, &p.gweight[i]);
    if (FUSED) {
      const A dx = to_acc(p.off[2 * i], A()), dy = to_acc(p.off[2 * i + 1], A());
      const A s = sigmoid(to_acc(p.scale[i], A()) + p.s0[g]);
      const A sx_ = p.smax[0], sy_ = p.smax[1];
      from_acc(gox * s * sx_, &p.goff[2 * i]);
      from_acc(goy * s * sy_, &p.goff[2 * i + 1]);
      gl = (gox * (dx + p.prior[2 * k]) * sx_ + goy * (dy + p.prior[2 * k + 1]) * sy_) * s * (A(1) - s);
      from_acc(gl, &p.gscale[i]);
    } else {
      from_acc(gox, &p.goff[2 * i]);
      from_acc(goy, &p.goff[2 * i + 1]);
    }
  }
  if (FUSED) {
    red[threadIdx.x] = gl;
    __syncthreads();
    if (threadIdx.x < p.G) {
      const int per_query = p.G * p.K;
      A s = A(0);
      for (int q = 0; q < static_cast<int>(blockDim.x) / per_query; ++q)
        for (int kk = 0; kk < p.K; ++kk) s += red[q * per_query + threadIdx.x * p.K + kk];
      b.s0_part[static_cast<int64_t>(blockIdx.x) * p.G + threadIdx.x] = s;
    }
  }
}

}  // namespace flowdcn
