// CPU emulation harness: runs the fp64 MSDCN backward kernels of ../ (untiled and both tiled modes) on the
// CPU, one std::thread per CUDA thread (cuda_emu.h), so their index and synchronisation logic is tested
// without a GPU (tests/cuda_ext/test_msdcn_cuda.py builds it with g++). Not part of the extension build.
//   harness DIR MODE FUSED TRUNC SPLIT B H W G C K TH TW R Q ROUNDS
// MODE 0: untiled kernel (Q queries x ROUNDS per block); 1: tiled, atomic window; 2: tiled, sorted window
// (tile TH x TW, radius R). Inputs DIR/{value,off,weight,gout[,scale,prior,s0,smax]}.bin (float64, the
// op's layouts); outputs DIR/{gvalue,goff,gweight,gscale,s0p}.bin.
#include "cuda_emu.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
namespace flowdcn { alignas(16) unsigned char smem_raw[1 << 21]; }
#include "msdcn_tiled.cuh"
using namespace flowdcn;
using A = double;

static std::vector<A> rd(const std::string& dir, const char* name, size_t n) {
  std::vector<A> v(n);
  FILE* f = std::fopen((dir + "/" + name + ".bin").c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(A), n, f) != n) { std::fprintf(stderr, "read %s failed\n", name); std::exit(2); }
  std::fclose(f);
  return v;
}
static void wr(const std::string& dir, const char* name, const std::vector<A>& v) {
  FILE* f = std::fopen((dir + "/" + name + ".bin").c_str(), "wb");
  std::fwrite(v.data(), sizeof(A), v.size(), f);
  std::fclose(f);
}

template <class Fn>
static void launch(dim3 grid, int threads, Fn fn) {
  emu::bDim = {unsigned(threads), 1, 1};
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
    }
}

int main(int argc, char** argv) {
  if (argc != 17) { std::fprintf(stderr, "usage: harness DIR MODE FUSED TRUNC SPLIT B H W G C K TH TW R Q ROUNDS\n"); return 2; }
  std::string dir = argv[1];
  int mode = std::atoi(argv[2]), fused = std::atoi(argv[3]), trunc_ = std::atoi(argv[4]), split = std::atoi(argv[5]);
  int64_t B = std::atoll(argv[6]), H = std::atoll(argv[7]), W = std::atoll(argv[8]);
  int G = std::atoi(argv[9]), C = std::atoi(argv[10]), K = std::atoi(argv[11]);
  int TH = std::atoi(argv[12]), TW = std::atoi(argv[13]), R = std::atoi(argv[14]), Q = std::atoi(argv[15]), RO = std::atoi(argv[16]);
  const int64_t N = B * H * W;
  auto value = rd(dir, "value", N * G * C), off = rd(dir, "off", N * G * K * 2), weight = rd(dir, "weight", N * G * K);
  auto gout = rd(dir, "gout", N * G * C);
  std::vector<A> scale, prior, s0, smax;
  if (fused) { scale = rd(dir, "scale", N * G * K); prior = rd(dir, "prior", K * 2); s0 = rd(dir, "s0", G); smax = rd(dir, "smax", 2); }
  std::vector<A> gvalue(N * G * C, 0.0), goff(N * G * K * 2, NAN), gweight(N * G * K, NAN), gscale(N * G * K, NAN);
  MsdcnParams<A, A, A> p{};
  p.value = value.data(); p.off = off.data(); p.weight = weight.data(); p.gout = gout.data();
  if (fused) { p.scale = scale.data(); p.prior = prior.data(); p.s0 = s0.data(); p.smax = smax.data(); }
  p.gvalue = gvalue.data(); p.goff = goff.data(); p.gweight = gweight.data(); p.gscale = gscale.data();
  p.N = N; p.H = H; p.W = W; p.G = G; p.C = C; p.K = K; p.L = C / 8; p.split = split; p.trunc = trunc_;
  std::vector<A> s0p;
  if (mode == 0) {
    p.Q = Q; p.R = RO;
    const int64_t blocks = (N + int64_t(Q) * RO - 1) / (int64_t(Q) * RO);
    s0p.assign(blocks * G, NAN);
    p.s0_part = s0p.data();
    launch({unsigned(blocks), 1, 1}, Q * G * p.L, [&] {
      if (fused) msdcn_backward_kernel<A, A, A, true>(p); else msdcn_backward_kernel<A, A, A, false>(p);
    });
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
      if (fused) { if (sorted) msdcn_backward_tiled_kernel<A, A, A, true, true>(p, ts); else msdcn_backward_tiled_kernel<A, A, A, true, false>(p, ts); }
      else { if (sorted) msdcn_backward_tiled_kernel<A, A, A, false, true>(p, ts); else msdcn_backward_tiled_kernel<A, A, A, false, false>(p, ts); }
    });
  }
  wr(dir, "gvalue", gvalue); wr(dir, "goff", goff); wr(dir, "gweight", gweight); wr(dir, "gscale", gscale); wr(dir, "s0p", s0p);
  std::printf("ok %zu s0 partials\n", s0p.size() / G);
  return 0;
}
