// CPU emulation harness: runs the MSDCN kernels of ../ (the backwards: untiled, both tiled modes, gather; the forward) on the
// CPU, one std::thread per CUDA thread (cuda_emu.h), so their index and synchronisation logic is tested
// without a GPU (tests/cuda_ext/test_msdcn_cuda.py builds it with g++). Not part of the extension build.
//   harness DIR MODE FUSED TRUNC SPLIT B H W G C K TH TW R Q ROUNDS DTYPE VEC   (DTYPE: f64 | f32 | bf16 | bf16x)
// MODE 0: untiled kernel (Q queries x ROUNDS per block); 1: tiled, atomic window; 2: tiled, sorted window
// (tile TH x TW, radius R); 3: gather (count, prefix sum here on the host, fill, pull with VEC runs of 8 channels
// per lane (0: the launcher's choice), epilogue); 4: the forward (Q queries x ROUNDS per block), output DIR/out.bin; 5: the
// forward bucketing the points as the packed training forward does, then the gather backward from its bucketing; 6: the
// plane backward, 7: the plane forward (output DIR/out.bin), B * G blocks of Q threads (msdcn_plane.cuh). Inputs DIR/{value,off,weight,gout[,scale,prior,s0,smax]}.bin (float64 in the
// op's layouts, converted to the kernel's types); outputs DIR/{gvalue,goff,gweight,gscale,s0p}.bin (float64).
#include "cuda_emu.h"
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
namespace flowdcn { alignas(16) unsigned char smem_raw[1 << 21]; }
#include "msdcn_tiled.cuh"
#include "msdcn_gather.cuh"
#include "msdcn_plane.cuh"
using namespace flowdcn;

inline double to_f64(double x) { return x; }
inline double to_f64(float x) { return x; }
inline double to_f64(__nv_bfloat16 x) { return __bfloat162float(x); }
inline void from_f64(double x, double& o) { o = x; }
inline void from_f64(double x, float& o) { o = static_cast<float>(x); }
inline void from_f64(double x, __nv_bfloat16& o) { o = __float2bfloat16_rn(static_cast<float>(x)); }

// Files hold float64; the kernels see them converted to their element type.
template <class E>
static std::vector<E> rd(const std::string& dir, const char* name, size_t n) {
  std::vector<double> v(n);
  FILE* f = std::fopen((dir + "/" + name + ".bin").c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(double), n, f) != n) { std::fprintf(stderr, "read %s failed\n", name); std::exit(2); }
  std::fclose(f);
  std::vector<E> out(n);
  for (size_t i = 0; i < n; ++i) from_f64(v[i], out[i]);
  return out;
}
template <class E>
static void wr(const std::string& dir, const char* name, const std::vector<E>& v) {
  std::vector<double> d(v.size());
  for (size_t i = 0; i < v.size(); ++i) d[i] = to_f64(v[i]);
  FILE* f = std::fopen((dir + "/" + name + ".bin").c_str(), "wb");
  std::fwrite(d.data(), sizeof(double), d.size(), f);
  std::fclose(f);
}

// smem: the block's dynamic shared memory as its launcher sizes it (the static buffer is larger): after each block the
// 4 KB past it must still hold the 0xff fill, so a kernel writing beyond what its launcher allocates fails the run.
// kUnchecked (the untiled and tiled scatter kernels here): no check.
constexpr size_t kUnchecked = ~size_t(0);
template <class Fn>
static void launch(dim3 grid, int threads, Fn fn, size_t smem = kUnchecked) {
  constexpr size_t kGuard = 4096;
  const bool check = smem != kUnchecked;
  if (check && smem + kGuard > sizeof(smem_raw)) { std::fprintf(stderr, "shared memory %zu exceeds the emulator's buffer\n", smem); std::exit(3); }
  emu::bDim = {unsigned(threads), 1, 1};
  emu::gDim = grid;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::memset(smem_raw, 0xff, sizeof(smem_raw));  // NaN garbage: nothing may rely on zeroed shared memory
      // (the emulated blocks run one after another, so one static buffer serves as every block's shared memory)
      emu::block_bar = std::make_unique<std::barrier<>>(threads);
      emu::warp_bar.clear();
      for (int w = 0; w * 32 < threads; ++w) emu::warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32, threads - 32 * w)));
      emu::shfl_buf.assign(threads, 0.0);
      std::vector<std::thread> ts;
      for (int t = 0; t < threads; ++t)
        ts.emplace_back([=] { emu::tIdx = {unsigned(t), 0, 0}; emu::bIdx = {bx, by, 0}; fn(); });
      for (auto& t : ts) t.join();
      for (size_t i = smem; check && i < smem + kGuard; ++i)
        if (smem_raw[i] != 0xff) {
          std::fprintf(stderr, "block (%u, %u) wrote shared memory byte %zu, beyond the %zu its launcher allocates\n", bx, by, i, smem);
          std::exit(3);
        }
    }
}

template <class T, class F, class A>
static int run(char** argv) {
  std::string dir = argv[1];
  int mode = std::atoi(argv[2]), fused = std::atoi(argv[3]), trunc_ = std::atoi(argv[4]), split = std::atoi(argv[5]);
  int64_t B = std::atoll(argv[6]), H = std::atoll(argv[7]), W = std::atoll(argv[8]);
  int G = std::atoi(argv[9]), C = std::atoi(argv[10]), K = std::atoi(argv[11]);
  int TH = std::atoi(argv[12]), TW = std::atoi(argv[13]), R = std::atoi(argv[14]), Q = std::atoi(argv[15]), RO = std::atoi(argv[16]);
  const int vec = std::atoi(argv[18]);  // gather pull: runs of 8 channels per lane, 0 = the launcher's automatic choice
  const int64_t N = B * H * W;
  auto value = rd<T>(dir, "value", N * G * C), gout = rd<T>(dir, "gout", N * G * C);
  auto off = rd<F>(dir, "off", N * G * K * 2), weight = rd<F>(dir, "weight", N * G * K);
  std::vector<F> scale;
  std::vector<A> prior, s0, smax;
  if (fused) { scale = rd<F>(dir, "scale", N * G * K); prior = rd<A>(dir, "prior", K * 2); s0 = rd<A>(dir, "s0", G); smax = rd<A>(dir, "smax", 2); }
  std::vector<A> gvalue(N * G * C, A(0));
  std::vector<F> goff(N * G * K * 2), gweight(N * G * K), gscale(N * G * K);
  for (auto* v : {&goff, &gweight, &gscale}) for (auto& x : *v) from_f64(NAN, x);  // unwritten elements show as NaN
  MsdcnParams<T, F, A> p{};
  p.value = value.data(); p.off = off.data(); p.weight = weight.data(); p.gout = gout.data();
  if (fused) { p.scale = scale.data(); p.prior = prior.data(); p.s0 = s0.data(); p.smax = smax.data(); }
  p.gvalue = gvalue.data(); p.goff = goff.data(); p.gweight = gweight.data(); p.gscale = gscale.data();
  p.N = N; p.H = H; p.W = W; p.G = G; p.C = C; p.K = K; p.L = C / 8; p.split = split; p.trunc = trunc_;
  const int64_t GC = int64_t(G) * C, GK = int64_t(G) * K, RW = GC + 4 * GK;
  p.vs = GC; p.os = 2 * GK; p.fs = GK;  // contiguous inputs (the launchers' make_params)
  // FLOWDCN_EMU_PACKED=1 (fused, f64/f32/bf16x): value and the fields in one [N, G*C + 4*G*K] array (value | delta | scale_logit |
  // weights per pixel), read at that row stride as the packed launchers pass them; the field grads (and the gather
  // backward's grad_value) are written into one such array, NaN-filled first, and read back from it.
  const char* pe = std::getenv("FLOWDCN_EMU_PACKED");
  const bool packed = pe && std::string(pe) == "1";
  std::vector<T> proj, gproj;
  if (packed) {
    if constexpr (std::is_same_v<T, F>) {
      if (!fused) { std::fprintf(stderr, "FLOWDCN_EMU_PACKED needs FUSED=1\n"); std::exit(2); }
      proj.resize(N * RW);
      for (int64_t n = 0; n < N; ++n) {
        std::copy_n(value.begin() + n * GC, GC, proj.begin() + n * RW);
        std::copy_n(off.begin() + n * 2 * GK, 2 * GK, proj.begin() + n * RW + GC);
        std::copy_n(scale.begin() + n * GK, GK, proj.begin() + n * RW + GC + 2 * GK);
        std::copy_n(weight.begin() + n * GK, GK, proj.begin() + n * RW + GC + 3 * GK);
      }
      gproj.resize(N * RW);
      for (auto& x : gproj) from_f64(NAN, x);
      p.value = proj.data(); p.off = proj.data() + GC; p.scale = proj.data() + GC + 2 * GK; p.weight = proj.data() + GC + 3 * GK;
      p.goff = gproj.data() + GC; p.gscale = gproj.data() + GC + 2 * GK; p.gweight = gproj.data() + GC + 3 * GK;
      p.vs = p.os = p.fs = RW;
    } else {
      std::fprintf(stderr, "FLOWDCN_EMU_PACKED needs DTYPE f64, f32 or bf16x (one dtype for value and fields)\n");
      std::exit(2);
    }
  }
  std::vector<A> s0p;
  const int64_t items = N * G * K, NB = gather_buckets(B, H, W, G);
  std::vector<int> counts(gather_count_words(NB, items), -7);  // the gather's bucketing: count zeroed, key and rank garbage
  std::fill(counts.begin(), counts.begin() + NB, 0);
  if (mode == 4 || mode == 5) {  // forward: Q queries per block, ROUNDS rounds; mode 5 also buckets the points
    p.Q = Q; p.R = RO;
    std::vector<T> out(N * G * C);
    for (auto& x : out) from_f64(NAN, x);
    p.out = out.data();
    if (mode == 5) {
      if (!fused) { std::fprintf(stderr, "MODE 5 needs FUSED=1 (only the fused forward buckets)\n"); std::exit(2); }
      p.bucket_count = counts.data();
      p.item_key = counts.data() + NB;
      p.item_rank = p.item_key + items;
    }
    const int64_t blocks = (N + int64_t(Q) * RO - 1) / (int64_t(Q) * RO);
    launch({unsigned(blocks), 1, 1}, Q * G * p.L, [&] {
      if (mode == 5 && fused) msdcn_forward_kernel<T, F, A, true, true>(p);
      else if (fused) msdcn_forward_kernel<T, F, A, true>(p);
      else msdcn_forward_kernel<T, F, A, false>(p);
    }, static_cast<size_t>(G) * K * sizeof(PointGeo<A>) * Q);  // the launcher's per_query * Q
    wr(dir, "out", out);
    std::printf("ok forward\n");
    if (mode == 4) return 0;
  }
  if (mode == 6 || mode == 7) {  // the plane kernels: B * G blocks of Q threads (a multiple of 32)
    const PlaneLayout lay = plane_layout(H, W, C, K, sizeof(T), sizeof(A), mode == 6);
    if (Q % 32 != 0) { std::fprintf(stderr, "plane kernels: Q (threads) must be a multiple of 32, got %d\n", Q); std::exit(2); }
    if (mode == 7) {
      std::vector<T> out(N * G * C);
      for (auto& x : out) from_f64(NAN, x);
      p.out = out.data();
      launch({unsigned(B * G), 1, 1}, Q, [&] {
        plane_kernel_forward<T, F, A>(fused, lay)(p, lay);
      }, lay.bytes);
      wr(dir, "out", out);
      std::printf("ok plane forward %zu bytes\n", lay.bytes);
      return 0;
    }
    std::vector<T> gv(N * G * C);
    for (auto& x : gv) from_f64(NAN, x);
    T* gdst = packed ? gproj.data() : gv.data();
    std::vector<A> part(B * G, A(NAN));
    p.s0_part = part.data();
    launch({unsigned(B * G), 1, 1}, Q, [&] {
      if (fused) msdcn_plane_backward_kernel<T, F, A, true>(p, gdst, lay); else msdcn_plane_backward_kernel<T, F, A, false>(p, gdst, lay);
    }, lay.bytes);
    s0p.assign(B * G, A(0));  // the kernel's [G, B] partials written out as [B, G] like the other kernels'
    if (fused)
      for (int64_t bb = 0; bb < B; ++bb)
        for (int g = 0; g < G; ++g) s0p[bb * G + g] = part[g * B + bb];
    if (packed) {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < GC; ++c) gvalue[n * GC + c] = static_cast<A>(to_f64(gproj[n * RW + c]));
    } else {
      for (size_t i = 0; i < gv.size(); ++i) gvalue[i] = static_cast<A>(to_f64(gv[i]));
    }
    std::printf("plane backward %zu bytes\n", lay.bytes);
  } else if (mode == 0) {
    p.Q = Q; p.R = RO;
    const int64_t blocks = (N + int64_t(Q) * RO - 1) / (int64_t(Q) * RO);
    s0p.assign(blocks * G, NAN);
    p.s0_part = s0p.data();
    launch({unsigned(blocks), 1, 1}, Q * G * p.L, [&] {
      if (fused) msdcn_backward_kernel<T, F, A, true>(p); else msdcn_backward_kernel<T, F, A, false>(p);
    });
  } else if (mode == 3 || mode == 5) {
    // The launcher's sequence (msdcn_cuda.cu gather_backward), with the prefix sum on the host; mode 5 starts from the
    // forward's bucketing (no count kernel).
    // The launcher's workspaces (gather_bind): garbage except start[0] (zeroed); every used word must be written.
    std::vector<int> ints(gather_int_words(NB, items), -7);
    ints[0] = 0;
    std::vector<A> floats(gather_float_words(items), A(NAN));
    std::vector<T> gv(N * G * C);
    for (auto& x : gv) from_f64(NAN, x);
    GatherBufs<T, A> b = gather_bind<T, A>(counts.data(), ints.data(), floats.data(), NB, items);
    b.gvalue = packed ? gproj.data() : gv.data();
    const unsigned item_blocks = unsigned((items + kGatherThreads - 1) / kGatherThreads);
    if (mode == 3)
      launch({item_blocks, 1, 1}, kGatherThreads, [&] {
        if (fused) msdcn_gather_count_kernel<T, F, A, true>(p, b); else msdcn_gather_count_kernel<T, F, A, false>(p, b);
      }, 0);
    for (int64_t i = 0; i < NB; ++i) b.start[i + 1] = b.start[i] + b.count[i];  // the launcher's cumsum
    launch({item_blocks, 1, 1}, kGatherThreads, [&] {
      if (fused) msdcn_gather_fill_kernel<T, F, A, true>(p, b); else msdcn_gather_fill_kernel<T, F, A, false>(p, b);
    }, 0);
    const int V = pull_runs(C, sizeof(A), vec);
    const bool group_major = split;  // the SPLIT argument picks the pull's block order here (the gather has no split)
    launch({unsigned(pull_blocks(N, G, C, V, group_major)), 1, 1}, kGatherThreads,
           [&] { pull_kernel<T, A>(V)(p.value, p.gout, b, N, H, W, G, C, p.vs, group_major); }, pull_smem_bytes(C, V, sizeof(A)));
    std::printf("pull runs %d\n", V);
    const int ep_threads = gather_epilogue_threads(G, K);
    const int64_t ep_blocks = (items + ep_threads - 1) / ep_threads;
    s0p.assign(ep_blocks * G, NAN);
    b.s0_part = s0p.data();
    launch({unsigned(ep_blocks), 1, 1}, ep_threads, [&] {
      if (fused) msdcn_gather_epilogue_kernel<T, F, A, true>(p, b); else msdcn_gather_epilogue_kernel<T, F, A, false>(p, b);
    }, ep_threads * sizeof(A));
    {  // the epilogue's partials are [G, blocks]; written out as [blocks, G] like the other kernels'
      std::vector<A> t(s0p.size());
      for (int64_t blk = 0; blk < ep_blocks; ++blk)
        for (int g = 0; g < G; ++g) t[blk * G + g] = s0p[g * ep_blocks + blk];
      s0p.swap(t);
    }
    if (packed) {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < GC; ++c) gvalue[n * GC + c] = static_cast<A>(to_f64(gproj[n * RW + c]));
    } else {
      for (size_t i = 0; i < gv.size(); ++i) gvalue[i] = static_cast<A>(to_f64(gv[i]));
    }
  } else {
    TileShape ts{};
    ts.TH = TH; ts.TW = TW; ts.R = R;
    // Same tile shape as tiled_shape() in ../msdcn_cuda.cu (P balanced over rounds of <= 320 threads).
    const int TQ = TH * TW, pmax = std::max(1, 320 / p.L), rounds = (TQ + pmax - 1) / pmax;
    ts.P = (TQ + rounds - 1) / rounds;
    ts.tiles_y = (H + TH - 1) / TH; ts.tiles_x = (W + TW - 1) / TW;
    const int threads = (ts.P * p.L + 31) / 32 * 32;
    const int64_t blocks = B * ts.tiles_y * ts.tiles_x;
    s0p.assign(blocks * G, NAN);
    p.s0_part = s0p.data();
    const bool sorted = mode == 2;
    launch({unsigned(blocks), unsigned(G), 1}, threads, [&] {
      if (fused) { if (sorted) msdcn_backward_tiled_kernel<T, F, A, true, true>(p, ts); else msdcn_backward_tiled_kernel<T, F, A, true, false>(p, ts); }
      else { if (sorted) msdcn_backward_tiled_kernel<T, F, A, false, true>(p, ts); else msdcn_backward_tiled_kernel<T, F, A, false, false>(p, ts); }
    });
  }
  if constexpr (std::is_same_v<T, F>) {
    if (packed) {  // the field grads, out of the packed grad array (NaN where a kernel left an element unwritten)
      for (int64_t n = 0; n < N; ++n) {
        std::copy_n(gproj.begin() + n * RW + GC, 2 * GK, goff.begin() + n * 2 * GK);
        std::copy_n(gproj.begin() + n * RW + GC + 2 * GK, GK, gscale.begin() + n * GK);
        std::copy_n(gproj.begin() + n * RW + GC + 3 * GK, GK, gweight.begin() + n * GK);
      }
    }
  }
  wr(dir, "gvalue", gvalue); wr(dir, "goff", goff); wr(dir, "gweight", gweight); wr(dir, "gscale", gscale); wr(dir, "s0p", s0p);
  std::printf("ok %zu s0 partials\n", s0p.size() / G);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 19) { std::fprintf(stderr, "usage: harness DIR MODE FUSED TRUNC SPLIT B H W G C K TH TW R Q ROUNDS DTYPE VEC\n"); return 2; }
  const std::string dt = argv[17];
  if (dt == "f64") return run<double, double, double>(argv);
  if (dt == "f32") return run<float, float, float>(argv);
  if (dt == "bf16") return run<__nv_bfloat16, float, float>(argv);  // bf16 value, fp32 fields (the benchmark's case)
  if (dt == "bf16x") return run<__nv_bfloat16, __nv_bfloat16, float>(argv);  // bf16 value and fields (autocast: the model's case)
  std::fprintf(stderr, "DTYPE must be f64, f32, bf16 or bf16x, got %s\n", dt.c_str());
  return 2;
}
