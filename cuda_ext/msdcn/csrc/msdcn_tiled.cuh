// Tiled MSDCN backward: grad_value accumulated per block in a shared-memory window, then flushed once.
//
// The untiled backward (msdcn_backward_kernel) sends every (query, point, corner) contribution to the
// fp32 grad_value buffer as a global atomic: N*G*K*4*C*4 bytes (21.7 GB at XL 64^2), which makes the
// kernel bound by L2 atomic throughput. Here a block owns one group g of a TH x TW tile of queries of
// one image. Sampling points land near their query (offsets are bounded by |delta + prior| * S_max *
// sigmoid), so the block keeps an fp32 window of (TH + 2R) x (TW + 2R) pixels x C channels in shared
// memory, corners outside it go straight to global memory as before, and at the end the window's
// non-zero 4-channel runs are added to grad_value with one 16-byte global atomic each.
//
// Two ways to add into the window (template SORTED):
//  - atomic: every lane adds its 8 channels of each in-window corner with shared-memory atomicAdd. On
//    sm_90 a shared fp32 atomicAdd is a compare-and-swap loop (ATOMS.CAST.SPIN), 8 per corner and lane.
//  - sorted: the in-window corners of a round are bucketed by window pixel (a counting sort with native
//    integer shared atomics: count, warp scan, place), grad_out of the round's queries is staged in shared
//    memory, and then each thread owns (window pixel, 4 channels) and sums its bucket's cw * grad_out
//    with plain loads and one non-atomic read-modify-write of the window. Everything else (geometry in shared memory, the per-lane corner
// dots, the chain rule of the field grads) is the untiled kernel's, restricted to one group per block.
// Results equal the untiled kernel's up to the order of the fp32 sums into grad_value.
#pragma once

#include "msdcn_kernels.cuh"

namespace flowdcn {

// Tile geometry of the tiled backward; the window is (TH + 2R) x (TW + 2R) pixels.
struct TileShape {
  int TH, TW, R;  // tile height/width in queries, halo radius in pixels
  int P;          // queries per round (threads = P * L); rounds = ceil(TH * TW / P)
  int64_t tiles_y, tiles_x;
};

// Geometry of one (query, point) of the tile plus its window placement: mask bits 0-3 say corner j is in
// the grid, bits 4-7 that it is also inside the window; pad holds the window pixel of corner (0, 0).
// SORTED: each in-window corner also takes a rank in its window pixel's bucket (cnt, rank).
template <bool FUSED, bool SORTED, typename T, typename F, typename A>
__device__ __forceinline__ void fill_geometry_tiled(const MsdcnParams<T, F, A>& p, const TileShape& ts, int g, int64_t b,
                                                    int64_t y0, int64_t x0, int q0, PointGeo<A>* geo, int* cnt,
                                                    unsigned short* rank) {
  const int items = ts.P * p.K;
  const int WW = ts.TW + 2 * ts.R, WH = ts.TH + 2 * ts.R;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int iq = it / p.K, ik = it - iq * p.K;
    const int qi = q0 + iq;  // query index inside the tile
    const int64_t y = y0 + qi / ts.TW, x = x0 + qi % ts.TW;
    PointGeo<A> e;
    e.row = 0;
    e.mask = 0;
    e.pad = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) e.cw[j] = A(0);
    if (qi < ts.TH * ts.TW && y < p.H && x < p.W) {
      const int64_t n = (b * p.H + y) * p.W + x;
      const FieldIdx fi = field_idx(p, n, g, ik);
      A ox, oy;
      point_offset<FUSED>(p, fi, g, ik, ox, oy);
      const A wk = to_acc(p.weight[fi.f], A());
      const Corners<A> c = corners(add_rn(A(x), ox), add_rn(A(y), oy), b, p.H, p.W, p.trunc);
      if (c.any) {
        e.row = c.row[0];
        // Corner (0, 0) in window coordinates; c.any bounds it to [-1, W-1] x [-1, H-1], so the casts are safe.
        const A px = add_rn(A(x), ox), py = add_rn(A(y), oy);
        const int64_t xi = static_cast<int64_t>(p.trunc ? trunc(px) : floor(px));
        const int64_t yi = static_cast<int64_t>(p.trunc ? trunc(py) : floor(py));
        const int lx = static_cast<int>(xi - (x0 - ts.R)), ly = static_cast<int>(yi - (y0 - ts.R));
        e.pad = ly * WW + lx;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (c.ok[j]) {
            e.mask |= 1 << j;
            e.cw[j] = wk * c.bil[j];
            const int cx = lx + (j & 1), cy = ly + (j >> 1);
            if (cx >= 0 && cx < WW && cy >= 0 && cy < WH) {
              e.mask |= 16 << j;
              if (SORTED) rank[4 * it + j] = static_cast<unsigned short>(atomicAdd(cnt + cy * WW + cx, 1));
            }
          }
        }
      }
    }
    geo[it] = e;
  }
}

// One block per (tile of one image, group): blockIdx.x = tile (b, ty, tx), blockIdx.y = group.
// Shared memory: window [WH*WW, C] of A, geometry [P, K], corner dots [threads, 4K+1], reduction [32].
// 4 consecutive values in shared memory (16-byte aligned for float: C % 8 == 0 and 4-channel runs).
__device__ __forceinline__ void sts4(float* s, const float* v) { *reinterpret_cast<float4*>(s) = make_float4(v[0], v[1], v[2], v[3]); }
__device__ __forceinline__ void sts4(double* s, const double* v) {
  reinterpret_cast<double2*>(s)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(s)[1] = make_double2(v[2], v[3]);
}

// One in-window contribution of the sorted mode: w_k * bilinear weight, and the query (in the round).
template <typename A>
struct __align__(2 * sizeof(A)) WinEntry {
  A cw;
  int q;
};

template <typename T, typename F, typename A, bool FUSED, bool SORTED, int MAXT = 320, int MINB = 2>
__global__ void __launch_bounds__(MAXT, MINB) msdcn_backward_tiled_kernel(const MsdcnParams<T, F, A> p, const TileShape ts) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int nthreads = blockDim.x;
  const int WW = ts.TW + 2 * ts.R, WH = ts.TH + 2 * ts.R;
  const int win_elems = WH * WW * p.C;
  const int items = ts.P * p.K;
  const int S = (4 * p.K) | 1;
  A* win = reinterpret_cast<A*>(smem_raw);                                       // [WH*WW, C]
  PointGeo<A>* geo = reinterpret_cast<PointGeo<A>*>(win + win_elems);            // [P, K] (16-byte aligned: C % 8 == 0)
  A* part = reinterpret_cast<A*>(geo + items);                                   // [nthreads, S]
  A* red = part + static_cast<int64_t>(nthreads) * S;                            // [32]
  // SORTED only (the host allocates these only then): staged grad_out, bucketed entries, counts, starts, ranks.
  const int WP = WH * WW;
  A* sgo = red + 32;                                                             // [P, C]
  WinEntry<A>* ent = reinterpret_cast<WinEntry<A>*>(sgo + ts.P * p.C);          // [P*K*4]
  int* cnt = reinterpret_cast<int*>(ent + 4 * items);                            // [WP]
  int* start = cnt + WP;                                                         // [WP + 1]
  unsigned short* rank = reinterpret_cast<unsigned short*>(start + WP + 1);      // [P*K*4]

  const int tid = threadIdx.x;
  const int q = tid / p.L, lane = tid - q * p.L;
  const int g = blockIdx.y;
  const int64_t tiles = ts.tiles_y * ts.tiles_x;
  const int64_t b = blockIdx.x / tiles, t = blockIdx.x - b * tiles;
  const int64_t y0 = (t / ts.tiles_x) * ts.TH, x0 = (t % ts.tiles_x) * ts.TW;
  const int64_t GC = static_cast<int64_t>(p.G) * p.C;
  // Channels of this thread, relative to the group: two runs of 4 (see msdcn_backward_kernel). The
  // split layout also makes the shared atomics of a query's lanes hit distinct banks.
  const int c0 = p.split ? lane * 4 : lane * kVec;
  const int c1 = p.split ? c0 + p.C / 2 : c0 + 4;
  const int64_t ch0 = g * p.C + c0, ch1 = g * p.C + c1;
  A* my = part + static_cast<int64_t>(tid) * S;
  const PointGeo<A>* mine = geo + q * p.K;
  A s0_sum = A(0);

  for (int i = tid; i < win_elems; i += nthreads) win[i] = A(0);
  if (SORTED)
    for (int i = tid; i < WP; i += nthreads) cnt[i] = 0;
  __syncthreads();  // zeroed counts before the first fill's rank atomics
  const int TQ = ts.TH * ts.TW;
  for (int q0 = 0; q0 < TQ; q0 += ts.P) {
    fill_geometry_tiled<FUSED, SORTED>(p, ts, g, b, y0, x0, q0, geo, cnt, rank);
    __syncthreads();  // also orders the window's zero-fill before the first shared atomics
    if (SORTED && tid < 32) {  // warp 0: exclusive scan of the bucket counts -> start[0..WP]
      const int per = (WP + 31) / 32, lo = min(WP, tid * per), hi = min(WP, lo + per);
      int sum = 0;
      for (int i = lo; i < hi; ++i) sum += cnt[i];
      int incl = sum;
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (tid >= o) incl += v;
      }
      int run = incl - sum;
      for (int i = lo; i < hi; ++i) {
        start[i] = run;
        run += cnt[i];
      }
      if (tid == 31) start[WP] = incl;
    }
    const int qi = q0 + q;
    const int64_t y = y0 + qi / ts.TW, x = x0 + qi % ts.TW;
    if (q < ts.P && qi < TQ && y < p.H && x < p.W) {
      const int64_t n = (b * p.H + y) * p.W + x;
      A go[kVec];
      load4(p.gout + n * GC + ch0, go);
      load4(p.gout + n * GC + ch1, go + 4);
      if (SORTED) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          sgo[q * p.C + c0 + i] = go[i];
          sgo[q * p.C + c1 + i] = go[4 + i];
        }
      }
      for (int k = 0; k < p.K; ++k) {
        const PointGeo<A> e = mine[k];
        A d[4] = {A(0), A(0), A(0), A(0)};
        if (e.mask & 15) {
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
            if (p.skip_value_grad) continue;  // benchmark diagnostic only
            if (SORTED && (e.mask & (16 << j))) continue;  // added to the window from the buckets
            A contrib[kVec];
#pragma unroll
            for (int i = 0; i < kVec; ++i) contrib[i] = e.cw[j] * go[i];
            if (e.mask & (16 << j)) {  // inside the window: shared-memory atomics
              A* w = win + static_cast<int64_t>(e.pad + (j & 1) + (j >> 1) * WW) * p.C;
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                atomicAdd(w + c0 + i, contrib[i]);
                atomicAdd(w + c1 + i, contrib[4 + i]);
              }
            } else {
              const int64_t base = corner_row(e.row, j, p.W) * GC;
              atomic_add4(p.gvalue + base + ch0, contrib);
              atomic_add4(p.gvalue + base + ch1, contrib + 4);
            }
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) my[4 * k + j] = d[j];
      }
    }
    __syncthreads();

    if (SORTED) {
      for (int it = tid; it < items; it += nthreads) {  // place each in-window corner in its bucket
        const PointGeo<A> e = geo[it];
        if (!(e.mask & 0xf0)) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (!(e.mask & (16 << j))) continue;
          const int wp = e.pad + (j & 1) + (j >> 1) * WW;
          WinEntry<A> w;
          w.cw = e.cw[j];
          w.q = it / p.K;
          ent[start[wp] + rank[4 * it + j]] = w;
        }
      }
      __syncthreads();
      const int C4 = p.C / 4;
      for (int it = tid; it < WP * C4; it += nthreads) {  // owner of (window pixel, 4 channels): no atomics
        const int wp = it / C4, r4 = it - wp * C4;
        const int e0 = start[wp], e1 = start[wp + 1];
        if (r4 == 0) cnt[wp] = 0;  // counts are read again only after the next round's fill
        if (e0 == e1) continue;
        A acc[4] = {A(0), A(0), A(0), A(0)};
        for (int e = e0; e < e1; ++e) {
          const WinEntry<A> w = ent[e];
          A v[4];
          lds4(sgo + w.q * p.C + 4 * r4, v);
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[i] += w.cw * v[i];
        }
        A* dst = win + static_cast<int64_t>(wp) * p.C + 4 * r4;
        A old[4];
        lds4(dst, old);
#pragma unroll
        for (int i = 0; i < 4; ++i) old[i] += acc[i];
        sts4(dst, old);
      }
    }

    for (int it = tid; it < items; it += nthreads) {
      const int iq = it / p.K, ik = it - iq * p.K;
      const int qi2 = q0 + iq;
      const int64_t y2 = y0 + qi2 / ts.TW, x2 = x0 + qi2 % ts.TW;
      if (qi2 >= TQ || y2 >= p.H || x2 >= p.W) continue;
      const int64_t n2 = (b * p.H + y2) * p.W + x2;
      const A* src = part + static_cast<int64_t>(iq * p.L) * S + 4 * ik;
      A D[4] = {A(0), A(0), A(0), A(0)};
      for (int l = 0; l < p.L; ++l) {
#pragma unroll
        for (int j = 0; j < 4; ++j) D[j] += src[l * S + j];
      }
      const FieldIdx fi = field_idx(p, n2, g, ik);
      A ox, oy;
      point_offset<FUSED>(p, fi, g, ik, ox, oy);
      const Corners<A> c = corners(add_rn(A(x2), ox), add_rn(A(y2), oy), b, p.H, p.W, p.trunc);
      s0_sum += point_field_grads<FUSED>(p, fi, g, ik, c, D);
    }
    __syncthreads();  // geometry, dots, buckets and staged grad_out are rewritten by the next round
  }

  // Flush: each non-zero 4-channel run of the window's in-image pixels, one 16-byte global atomic.
  if (!p.skip_value_grad) {
    const int C4 = p.C / 4;
    for (int i = tid; i < WH * WW * C4; i += nthreads) {
      const int wp = i / C4, r4 = i - wp * C4;
      const int64_t y = y0 - ts.R + wp / WW, x = x0 - ts.R + wp % WW;
      if (y < 0 || y >= p.H || x < 0 || x >= p.W) continue;
      A v[4];
      lds4(win + static_cast<int64_t>(wp) * p.C + 4 * r4, v);
      if (v[0] == A(0) && v[1] == A(0) && v[2] == A(0) && v[3] == A(0)) continue;
      atomic_add4(p.gvalue + ((b * p.H + y) * p.W + x) * GC + g * p.C + 4 * r4, v);
    }
  }
  if (FUSED) {  // block sum of d/ds0[g]
    const A tot = block_sum_ordered(s0_sum, red);
    if (tid == 0) p.s0_part[static_cast<int64_t>(blockIdx.x) * p.G + g] = tot;
  }
}

}  // namespace flowdcn
