// Host launchers of the MSDCN kernels: dtype dispatch, launch geometry, device guard, current stream.
// Input checking that needs no GPU (shapes, contiguity, alignment, dtype pairing) is done in Python
// (cuda_ext/msdcn/cuda.py); the TORCH_CHECKs here guard the assumptions the kernels rely on.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "msdcn_kernels.cuh"
#include "msdcn_tiled.cuh"
#include "msdcn_gather.cuh"
#include "msdcn_plane.cuh"

namespace flowdcn {
namespace {


// Error text built without iostreams. On the GPU machine (torch 2.11+cu130), a TORCH_CHECK given a number, which
// c10::str formats with an ostringstream in this extension's code, killed the process with SIGSEGV instead of raising,
// in the nvcc- and the g++-compiled units alike (strings, std::to_string and libtorch's own checks were fine; likely
// two libstdc++ locale states in one process). So every TORCH_CHECK here passes one string made by errmsg:
// std::to_string for numbers, c10::toString for dtypes, Device::str() for devices (formatted inside libc10).
inline std::string err_piece(const char* s) { return s; }
inline std::string err_piece(const std::string& s) { return s; }
inline std::string err_piece(at::ScalarType t) { return c10::toString(t); }
inline std::string err_piece(const c10::Device& d) { return d.str(); }
template <typename N, typename = std::enable_if_t<std::is_arithmetic_v<N>>>
inline std::string err_piece(N n) { return std::to_string(n); }
template <typename... Args>
std::string errmsg(const Args&... args) {
  std::string out;
  ((out += err_piece(args)), ...);
  return out;
}

struct Geometry {
  int64_t N, H, W;
  int G, C, K, L, Q, R, threads;
  int64_t blocks;
};

// Launch shape: Q queries per block (from the threads target, lowered until the shared memory of a
// block, bytes_per_query * Q, fits in 48 KB), R rounds per block.
Geometry geometry(const at::Tensor& value, const at::Tensor& weight, int64_t target_threads, int64_t rounds,
                  size_t bytes_per_query) {
  Geometry g;
  g.N = value.size(0) * value.size(1) * value.size(2);
  g.H = value.size(1);
  g.W = value.size(2);
  g.G = static_cast<int>(value.size(3));
  g.C = static_cast<int>(value.size(4));
  g.K = static_cast<int>(weight.size(4));
  TORCH_CHECK(g.C % kVec == 0, errmsg("msdcn_cuda: C must be a multiple of 8, got ", g.C));
  g.L = g.C / kVec;
  const int gl = g.G * g.L;
  TORCH_CHECK(gl <= kMaxThreads, errmsg("msdcn_cuda: G * C / 8 must be <= ", kMaxThreads, " (one block holds a whole query), got ", gl));
  TORCH_CHECK(target_threads > 0 && target_threads <= kMaxThreads,
              errmsg("msdcn_cuda: threads per block must be in [1, ", kMaxThreads, "], got ", target_threads));
  g.Q = std::max<int>(1, static_cast<int>(target_threads) / gl);  // several queries per block
  while (g.Q > 1 && bytes_per_query * g.Q > 48 * 1024) --g.Q;
  g.threads = g.Q * gl;
  TORCH_CHECK(rounds >= 1, errmsg("msdcn_cuda: rounds per block must be >= 1, got ", rounds));
  g.R = static_cast<int>(rounds);
  const int64_t per_block = static_cast<int64_t>(g.Q) * g.R;
  g.blocks = (g.N + per_block - 1) / per_block;
  TORCH_CHECK(g.blocks < (int64_t(1) << 31), errmsg("msdcn_cuda: too many queries for one launch: ", g.N));
  return g;
}

// Kernel attributes are per-(function, device) driver state. The driver calls below (occupancy query,
// attribute get/set) cost host time on every layer of every step, so each answer is computed once per
// process and an attribute is set only when its value changes.
struct AttrCache {
  std::mutex mu;
  std::map<std::pair<const void*, int>, int> smem_limit;                // (kernel, device) -> dynamic smem limit set
  std::map<std::pair<const void*, int>, int> carveout;                  // (kernel, device) -> carveout % set
  std::map<std::tuple<const void*, int, int, size_t>, int> carveout_for;  // (kernel, device, threads, smem) -> %
  std::map<int, std::pair<int, int>> device_smem;                       // device -> (per block opt-in, per SM)
  std::map<int, int> sms;                                               // device -> streaming multiprocessors
  std::map<const void*, int> regs;                                      // kernel -> registers per thread
};
AttrCache& attr_cache() {
  static AttrCache cache;
  return cache;
}

std::pair<int, int> device_smem(int device) {  // caller holds the cache lock
  auto& c = attr_cache();
  auto it = c.device_smem.find(device);
  if (it != c.device_smem.end()) return it->second;
  int block_max = 0, sm_max = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&block_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_max, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  return c.device_smem[device] = {block_max, sm_max};
}

int max_smem_per_block(int device) {
  std::lock_guard<std::mutex> lock(attr_cache().mu);
  return device_smem(device).first;
}

// Raise a kernel's dynamic shared-memory limit when it needs more than the default 48 KB.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t smem, int device, const Geometry& geo) {
  if (smem <= 48 * 1024) return;
  auto& c = attr_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const int dev_max = device_smem(device).first;
  TORCH_CHECK(smem <= static_cast<size_t>(dev_max), errmsg("msdcn_cuda: needs ", smem, " bytes of shared memory per block (K=", geo.K,
                                                           ", G=", geo.G, ", C=", geo.C, "), the device allows ", dev_max));
  int& limit = c.smem_limit[{reinterpret_cast<const void*>(kernel), device}];
  if (static_cast<size_t>(limit) >= smem) return;  // a higher limit set earlier also admits this launch
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  limit = static_cast<int>(smem);
}

// Ask for only the shared memory the resident blocks need: the rest stays L1 for the corner gathers.
template <typename Kernel>
void prefer_l1(Kernel kernel, int threads, size_t smem, int device) {
  auto& c = attr_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const void* key = reinterpret_cast<const void*>(kernel);
  auto it = c.carveout_for.find({key, device, threads, smem});
  if (it == c.carveout_for.end()) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    const size_t need = static_cast<size_t>(std::max(per_sm, 1)) * (smem + 1024);
    const int max_sm = std::max(device_smem(device).second, 1);
    const int pct = static_cast<int>(std::min<size_t>(100, (100 * need + max_sm - 1) / max_sm));
    it = c.carveout_for.emplace(std::make_tuple(key, device, threads, smem), pct).first;
  }
  auto cur = c.carveout.find({key, device});
  if (cur != c.carveout.end() && cur->second == it->second) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, it->second));
  c.carveout[{key, device}] = it->second;
}

// Shared memory of a tiled-backward block: window, geometry, per-thread corner dots, reduction slots.
// Sorted mode adds staged grad_out [P, C], entries [4PK] (2 accumulators each), counts and starts
// [2 WP + 1] ints and ranks [4PK] ushorts (see msdcn_backward_tiled_kernel).
size_t tiled_smem(const Geometry& geo, const TileShape& ts, int threads, size_t acc_bytes, size_t geo_bytes, bool sorted) {
  const size_t wp = static_cast<size_t>(ts.TH + 2 * ts.R) * (ts.TW + 2 * ts.R);
  const size_t S = (4 * geo.K) | 1;
  const size_t items = static_cast<size_t>(ts.P) * geo.K;
  size_t bytes = wp * geo.C * acc_bytes + items * geo_bytes + static_cast<size_t>(threads) * S * acc_bytes + 32 * acc_bytes;
  if (sorted) bytes += static_cast<size_t>(ts.P) * geo.C * acc_bytes + 4 * items * 2 * acc_bytes + (2 * wp + 1) * 4 + 4 * items * 2;
  return bytes;
}

// Tile shape of the tiled backward: P queries per round (as many as fit in 320 threads, balanced over
// the rounds), the requested halo radius lowered only until a block's shared memory fits the device.
// Returns false when the shape is not served (then the untiled kernel runs): more than 320 lanes per
// query, sorted-mode ranks that could overflow, or not even a radius-0 window fits.
bool tiled_shape(const Geometry& geo, int64_t tile_h, int64_t tile_w, int64_t radius, size_t acc_bytes, size_t geo_bytes,
                 bool sorted, int device, TileShape& ts) {
  TORCH_CHECK(tile_h >= 1 && tile_w >= 1 && tile_h * tile_w <= 4096,
              errmsg("msdcn_cuda: tile must be >= 1x1 and <= 4096 queries, got ", tile_h, "x", tile_w));
  TORCH_CHECK(radius >= 0 && radius <= 64, errmsg("msdcn_cuda: tile radius must be in [0, 64], got ", radius));
  constexpr int kTiledThreads = 320;  // msdcn_backward_tiled_kernel's launch bound
  if (geo.L > kTiledThreads) return false;
  if (sorted && 4 * static_cast<int64_t>(std::max(1, kTiledThreads / geo.L)) * geo.K > 65535) return false;  // ranks are ushort
  ts.TH = static_cast<int>(tile_h);
  ts.TW = static_cast<int>(tile_w);
  const int TQ = ts.TH * ts.TW;
  const int pmax = std::max(1, kTiledThreads / geo.L);
  const int rounds = (TQ + pmax - 1) / pmax;
  ts.P = (TQ + rounds - 1) / rounds;
  ts.tiles_y = (geo.H + ts.TH - 1) / ts.TH;
  ts.tiles_x = (geo.W + ts.TW - 1) / ts.TW;
  const int threads = (ts.P * geo.L + 31) / 32 * 32;
  const int block_max = max_smem_per_block(device);
  ts.R = static_cast<int>(radius);
  while (ts.R > 0 && tiled_smem(geo, ts, threads, acc_bytes, geo_bytes, sorted) > static_cast<size_t>(block_max)) --ts.R;
  return tiled_smem(geo, ts, threads, acc_bytes, geo_bytes, sorted) <= static_cast<size_t>(block_max);
}

template <typename T, typename F, typename A>
MsdcnParams<T, F, A> make_params(const Geometry& geo, const at::Tensor& value, const at::Tensor& off, const at::Tensor& scale,
                                 const at::Tensor& weight, const at::Tensor& prior, const at::Tensor& s0, const at::Tensor& smax,
                                 bool fused, bool trunc) {
  MsdcnParams<T, F, A> p{};
  p.value = reinterpret_cast<const T*>(value.data_ptr());
  p.off = reinterpret_cast<const F*>(off.data_ptr());
  p.weight = reinterpret_cast<const F*>(weight.data_ptr());
  if (fused) {
    p.scale = reinterpret_cast<const F*>(scale.data_ptr());
    p.prior = reinterpret_cast<const A*>(prior.data_ptr());
    p.s0 = reinterpret_cast<const A*>(s0.data_ptr());
    p.smax = reinterpret_cast<const A*>(smax.data_ptr());
  }
  p.N = geo.N; p.H = geo.H; p.W = geo.W;
  p.vs = static_cast<int64_t>(geo.G) * geo.C;  // contiguous tensors; the packed launchers set the projection's row
  p.os = 2 * static_cast<int64_t>(geo.G) * geo.K;
  p.fs = static_cast<int64_t>(geo.G) * geo.K;
  p.G = geo.G; p.C = geo.C; p.K = geo.K; p.L = geo.L; p.Q = geo.Q; p.R = geo.R;
  p.trunc = trunc;
  return p;
}

// Dispatch over the supported (value, field) dtype pairs; A is fp64 for fp64 values, else fp32.
#define FLOWDCN_DISPATCH(VDT, FDT, NAME, ...)                                                                  \
  [&] {                                                                                                      \
    if (VDT == at::kBFloat16 && FDT == at::kBFloat16) {                                                      \
      using T = __nv_bfloat16; using F = __nv_bfloat16; using A = float; return __VA_ARGS__();                \
    } else if (VDT == at::kBFloat16 && FDT == at::kFloat) {                                                  \
      using T = __nv_bfloat16; using F = float; using A = float; return __VA_ARGS__();                        \
    } else if (VDT == at::kHalf && FDT == at::kHalf) {                                                       \
      using T = __half; using F = __half; using A = float; return __VA_ARGS__();                              \
    } else if (VDT == at::kHalf && FDT == at::kFloat) {                                                      \
      using T = __half; using F = float; using A = float; return __VA_ARGS__();                               \
    } else if (VDT == at::kFloat && FDT == at::kFloat) {                                                     \
      using T = float; using F = float; using A = float; return __VA_ARGS__();                                \
    } else if (VDT == at::kDouble && FDT == at::kDouble) {                                                   \
      using T = double; using F = double; using A = double; return __VA_ARGS__();                             \
    }                                                                                                        \
    TORCH_CHECK(false, errmsg(NAME ": unsupported dtypes value=", VDT, " fields=", FDT,                        \
                " (supported: bf16/fp16 values with fields of the same dtype or fp32; fp32/fp32; fp64/fp64)")); \
  }()

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& value) {
  TORCH_CHECK(t.is_cuda(), errmsg("msdcn_cuda: ", name, " must be a CUDA tensor"));
  TORCH_CHECK(t.device() == value.device(), errmsg("msdcn_cuda: ", name, " is on ", t.device(), " but value is on ", value.device()));
  TORCH_CHECK(t.is_contiguous(), errmsg("msdcn_cuda: ", name, " must be contiguous"));
}

// The kernels read prior[2K], s0[G] and s_max[2] unchecked: their sizes are checked here (the Python entry points check
// shapes too; this guards direct calls of the ops).
void check_consts(const at::Tensor& prior, const at::Tensor& s0, const at::Tensor& smax, int64_t G, int64_t K) {
  TORCH_CHECK(prior.numel() == 2 * K && s0.numel() == G && smax.numel() == 2,
              errmsg("msdcn_cuda: prior, s0 and s_max must have 2K = ", 2 * K, ", G = ", G, " and 2 elements, got ", prior.numel(), ", ",
                     s0.numel(), " and ", smax.numel()));
}

void check_all(const at::Tensor& value, const at::Tensor& off, const at::Tensor& scale, const at::Tensor& weight,
               const at::Tensor& prior, const at::Tensor& s0, const at::Tensor& smax, bool fused) {
  check_cuda(value, "value", value);
  check_cuda(off, fused ? "delta" : "offsets", value);
  check_cuda(weight, "weights", value);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(value.data_ptr()) % 16 == 0, "msdcn_cuda: value must be 16-byte aligned");
  TORCH_CHECK(off.scalar_type() == weight.scalar_type(), "msdcn_cuda: offsets/delta and weights must share a dtype");
  if (fused) {
    check_cuda(scale, "scale_logit", value);
    check_cuda(prior, "prior", value);
    check_cuda(s0, "s0", value);
    check_cuda(smax, "s_max", value);
    TORCH_CHECK(scale.scalar_type() == weight.scalar_type(), "msdcn_cuda: scale_logit and weights must share a dtype");
    const auto adt = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(prior.scalar_type() == adt && s0.scalar_type() == adt && smax.scalar_type() == adt,
                errmsg("msdcn_cuda: prior, s0 and s_max must be ", adt));
    if (value.dim() == 5 && weight.dim() == 5) check_consts(prior, s0, smax, value.size(3), weight.size(4));
  }
}

// An environment switch read by the launchers: its value, default when unset; anything outside allowed is an error.
std::string env_choice(const char* name, const char* dflt, std::initializer_list<const char*> allowed) {
  const char* e = std::getenv(name);
  const std::string v = e ? e : dflt;
  std::string all;
  for (const char* a : allowed) {
    if (v == a) return v;
    all += std::string(all.empty() ? "" : ", ") + a;
  }
  TORCH_CHECK(false, errmsg(name, " must be one of ", all, ", got ", v));
}

// True when the gather backward serves this shape: a pixel's lanes fit in one warp (C <= 256), a query's
// items fit in one epilogue block (G*K <= 1024), and the corner slots (N*G*K*4) and buckets fit in int32.
// (Every backward also needs G * C/8 <= 512, checked by geometry() first and by cuda.supports() in Python.)
bool gather_serves(const at::Tensor& value, const at::Tensor& weight) {
  const int64_t B = value.size(0), H = value.size(1), W = value.size(2), G = value.size(3), C = value.size(4), K = weight.size(4);
  const int64_t limit = (int64_t(1) << 31) - 1;
  return C / kVec <= 32 && G * K <= 1024 && B * H * W * G * K * 4 < limit && gather_buckets(B, H, W, G) < limit;
}

// Streaming multiprocessors of a device (cached: asked on every layer).
int sm_count(int device) {
  auto& c = attr_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.sms.find(device);
  if (it != c.sms.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return c.sms[device] = n;
}

// FLOWDCN_MSDCN_PLANE=on (default) | off | fwd | bwd | force: which plane kernels (msdcn_plane.cuh) may run; force: both,
// also below the block-count rule of plane_serves (the tests' small shapes). Read on every call (a benchmark switch:
// bench/msdcn_op.py compares them in one process).
std::string plane_switch() { return env_choice("FLOWDCN_MSDCN_PLANE", "on", {"on", "off", "fwd", "bwd", "force"}); }

// Registers per thread of a kernel (cached per kernel: asked on every launch).
int kernel_regs(const void* kernel) {
  auto& c = attr_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.regs.find(kernel);
  if (it != c.regs.end()) return it->second;
  cudaFuncAttributes fa{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
  return c.regs[kernel] = fa.numRegs;
}

// Threads per plane block: FLOWDCN_MSDCN_PLANE_THREADS (a benchmark switch; a multiple of 32 up to 1024). Else the forward
// takes 1024; the backward, when two blocks fit an SM's shared memory (they overlap each other's phases), 512 or 576,
// whichever leaves fewer idle thread slots over its two per-item loops (P points, tasks (pixel, 8 channels)) and lets
// two blocks' registers fit (XL 16^2: 576 = 2304 / 4); when only one block fits, 1024. Measured on an H200: bench/RESULTS.md.
int plane_threads(size_t smem, int64_t P, int64_t tasks, const void* kernel, bool backward, int device) {
  const char* e = std::getenv("FLOWDCN_MSDCN_PLANE_THREADS");
  if (e) {
    const int n = std::atoi(e);
    TORCH_CHECK(n >= 32 && n <= kPlaneMaxThreads && n % 32 == 0,
                errmsg("FLOWDCN_MSDCN_PLANE_THREADS must be a multiple of 32 in [32, ", kPlaneMaxThreads, "], got ", e));
    return n;
  }
  if (!backward) return kPlaneMaxThreads;
  int per_sm = 0;
  {
    std::lock_guard<std::mutex> lock(attr_cache().mu);
    per_sm = device_smem(device).second;
  }
  if (2 * (smem + 1024) > static_cast<size_t>(per_sm)) return kPlaneMaxThreads;
  // (512 always passes the register test: the kernel is capped at 64 registers or fewer (plane_backward_regs),
  // 2 * 512 * 64 = 64K)
  const int regs = kernel_regs(kernel);
  int best = 512;
  int64_t best_slots = -1;
  for (int t : {512, 576}) {
    if (2 * t * ((regs + 7) / 8 * 8) > 65536) continue;  // two blocks' registers (allocated in 8s) must fit the 64K
    const int64_t slots = ((P + t - 1) / t + (tasks + t - 1) / t) * t;
    if (best_slots < 0 || slots <= best_slots) {
      best = t;
      best_slots = slots;
    }
  }
  return best;
}

// True when a plane kernel serves this shape on this device: its block's shared memory (a group's value plane, and for
// the backward grad_out's and the per-point lists) fits the device, its indices fit, C is a multiple of 8, and there
// are at least half as many (image, group) blocks as SMs (below that the regular kernels spread the work wider).
bool plane_serves(int64_t B, int64_t H, int64_t W, int64_t G, int64_t C, int64_t K, size_t tbytes, size_t abytes, bool backward,
                  int device) {
  const std::string sw = plane_switch();
  if (sw == "off" || sw == (backward ? "fwd" : "bwd")) return false;
  if (C % kVec != 0 || C <= 0 || !plane_indices_fit(B, H, W, G, K)) return false;
  if (sw != "force" && 2 * B * G < sm_count(device)) return false;
  const PlaneLayout lay = plane_layout(H, W, static_cast<int>(C), static_cast<int>(K), tbytes, abytes, backward);
  return lay.bytes <= static_cast<size_t>(max_smem_per_block(device));
}

// The plane backward (msdcn_plane.cuh): one block per (image, group); grad_value written to gvalue (the value's dtype
// and layout, p.vs per pixel); returns d/ds0 [G] when fused (else an empty tensor).
template <typename T, typename F, typename A>
at::Tensor plane_backward(MsdcnParams<T, F, A> p, bool fused, const at::Tensor& value, T* gvalue, cudaStream_t stream) {
  const int64_t B = value.size(0);
  PlaneLayout lay = plane_layout(p.H, p.W, p.C, p.K, sizeof(T), sizeof(A), true);
  const char* diag = std::getenv("FLOWDCN_MSDCN_PLANE_DIAG");  // benchmark diagnostic only (wrong grads)
  lay.diag = diag ? std::atoi(diag) : 0;
  if (lay.diag)
    TORCH_WARN_ONCE(errmsg("FLOWDCN_MSDCN_PLANE_DIAG=", diag, " is set: the plane backward leaves phases out and its gradients are "
                           "WRONG (a benchmark diagnostic; unset it for training)"));
  const auto aopt = value.options().dtype(value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor s0p = fused ? at::empty({p.G, B}, aopt) : at::empty({0}, aopt);
  if (fused) p.s0_part = reinterpret_cast<A*>(s0p.data_ptr());
  auto kernel = fused ? msdcn_plane_backward_kernel<T, F, A, true> : msdcn_plane_backward_kernel<T, F, A, false>;
  Geometry geo{};
  geo.G = p.G; geo.C = p.C; geo.K = p.K;
  allow_smem(kernel, lay.bytes, value.get_device(), geo);
  const int threads = plane_threads(lay.bytes, p.H * p.W * p.K, p.H * p.W * lay.lanes.d, reinterpret_cast<const void*>(kernel), true,
                                    value.get_device());
  kernel<<<static_cast<unsigned>(B * p.G), threads, lay.bytes, stream>>>(p, gvalue, lay);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return fused ? s0p.sum(1) : s0p;
}

// The gather backward (msdcn_gather.cuh): count, scan, fill, pull, epilogue on the current stream. grad_value is written
// to gvalue (the value's dtype and layout: p.vs per pixel); returns d/ds0 [G] when fused (else an empty tensor).
// Workspaces (gather_bind): the bucketing [count | key | rank] (counted: kept from the training forward; else allocated
// and counted here), one int32 workspace [start | row | pos] and one float workspace of the entries' corner weights and
// dots (few allocations: at 16² the host's share shows in eager timings). Where the plane backward serves the shape
// (plane_serves), the callers run it instead.
template <typename T, typename F, typename A>
at::Tensor gather_backward(MsdcnParams<T, F, A> p, bool fused, const at::Tensor& value, T* gvalue, int64_t pull_vec_req,
                           cudaStream_t stream, const at::Tensor& counted = at::Tensor()) {
  const int64_t items = p.N * p.G * p.K, NB = gather_buckets(value.size(0), p.H, p.W, p.G);
  const auto aopt = value.options().dtype(value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  // Runs of 8 channels per pull lane (requested by cuda.py from FLOWDCN_MSDCN_PULL_VEC, which it validates; 0 = auto).
  TORCH_CHECK(pull_vec_req >= 0 && pull_vec_req <= kPullMaxRuns,
              errmsg("msdcn_cuda: pull runs per lane must be in [0, ", kPullMaxRuns, "], got ", pull_vec_req));
  const int V = pull_runs(p.C, sizeof(A), static_cast<int>(pull_vec_req));
  TORCH_CHECK((p.C / kVec) % V == 0, errmsg("msdcn_cuda: pull runs per lane (FLOWDCN_MSDCN_PULL_VEC) ", V, " must divide C/8 = ", p.C / kVec));
  // counted: the bucketing [count | key | rank] the training forward wrote (gather_count_words); else counted here.
  const bool have_counts = counted.defined() && counted.numel() > 0;
  at::Tensor counts = have_counts ? counted : at::empty({gather_count_words(NB, items)}, value.options().dtype(at::kInt));
  TORCH_CHECK(counts.numel() == gather_count_words(NB, items) && counts.scalar_type() == at::kInt && counts.is_contiguous(),
              errmsg("msdcn_cuda: the forward's bucketing must be ", gather_count_words(NB, items), " int32 words, got ", counts.numel()));
  auto ints = at::empty({gather_int_words(NB, items)}, value.options().dtype(at::kInt));
  auto floats = at::empty({gather_float_words(items)}, aopt);
  GatherBufs<T, A> b = gather_bind<T, A>(counts.data_ptr<int>(), ints.data_ptr<int>(), reinterpret_cast<A*>(floats.data_ptr()), NB, items);
  b.gvalue = gvalue;
  C10_CUDA_CHECK(cudaMemsetAsync(b.start, 0, sizeof(int), stream));  // start[0]; start[1:] is the scan below
  const int64_t item_blocks = (items + kGatherThreads - 1) / kGatherThreads;
  TORCH_CHECK(item_blocks < (int64_t(1) << 31), errmsg("msdcn_cuda: too many points for one launch: ", items));
  if (!have_counts) {
    C10_CUDA_CHECK(cudaMemsetAsync(b.count, 0, NB * sizeof(int), stream));
    auto count_k = fused ? msdcn_gather_count_kernel<T, F, A, true> : msdcn_gather_count_kernel<T, F, A, false>;
    count_k<<<item_blocks, kGatherThreads, 0, stream>>>(p, b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor scanned = ints.narrow(0, 1, NB);  // start[1:]
  at::cumsum_out(scanned, counts.narrow(0, 0, NB), 0, at::kInt);  // on the current stream
  auto fill_k = fused ? msdcn_gather_fill_kernel<T, F, A, true> : msdcn_gather_fill_kernel<T, F, A, false>;
  fill_k<<<item_blocks, kGatherThreads, 0, stream>>>(p, b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Pull block order (a benchmark switch, read on first use): FLOWDCN_MSDCN_PULL_ORDER=group (default; a block
  // serves one group of a run of pixels) | pixel (consecutive (pixel, group) pairs).
  static const bool group_major = env_choice("FLOWDCN_MSDCN_PULL_ORDER", "group", {"group", "pixel"}) == "group";
  const int64_t blocks = pull_blocks(p.N, p.G, p.C, V, group_major);
  TORCH_CHECK(blocks < (int64_t(1) << 31), errmsg("msdcn_cuda: too many pixels for one launch: ", p.N));
  const size_t smem = pull_smem_bytes(p.C, V, sizeof(A));
  auto pull_k = pull_kernel<T, A>(V);
  if (smem > 48 * 1024)  // only fp64 with C >= 224: rare, so no attribute cache
    C10_CUDA_CHECK(cudaFuncSetAttribute(pull_k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  pull_k<<<blocks, kGatherThreads, smem, stream>>>(p.value, p.gout, b, p.N, p.H, p.W, p.G, p.C, p.vs, group_major);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int ep_threads = gather_epilogue_threads(p.G, p.K);
  const int64_t ep_blocks = (items + ep_threads - 1) / ep_threads;
  // d/ds0 partials [G, blocks]: summed along contiguous rows (the [blocks, G] layout's column sum took 8 us at XL 16^2).
  at::Tensor s0p = fused ? at::empty({p.G, ep_blocks}, aopt) : at::empty({0}, aopt);
  if (fused) b.s0_part = reinterpret_cast<A*>(s0p.data_ptr());
  auto ep_k = fused ? msdcn_gather_epilogue_kernel<T, F, A, true> : msdcn_gather_epilogue_kernel<T, F, A, false>;
  ep_k<<<ep_blocks, ep_threads, ep_threads * sizeof(A), stream>>>(p, b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return fused ? s0p.sum(1) : s0p;
}

// The forward on the current stream. row: 0 for contiguous value/off/scale/weight, else the packed projection's row length
// (the views' per-pixel stride; see msdcn_forward_packed).
// counts (when defined): the gather backward's bucketing [count | key | rank] (gather_count_words), written by this forward.
at::Tensor forward_launch(const at::Tensor& value, const at::Tensor& off, const at::Tensor& scale, const at::Tensor& weight,
                          const at::Tensor& prior, const at::Tensor& s0, const at::Tensor& smax, bool fused, bool trunc,
                          int64_t threads, int64_t rounds, int64_t row, const at::Tensor& counts = at::Tensor()) {
  const c10::cuda::CUDAGuard guard(value.device());
  auto out = at::empty(value.sizes(), value.options());  // contiguous (value may be a strided view)
  if (value.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  FLOWDCN_DISPATCH(value.scalar_type(), weight.scalar_type(), "msdcn_forward", [&] {
    const size_t per_query = static_cast<size_t>(value.size(3)) * weight.size(4) * sizeof(PointGeo<A>);
    const Geometry geo = geometry(value, weight, threads, rounds, per_query);
    auto p = make_params<T, F, A>(geo, value, off, scale, weight, prior, s0, smax, fused, trunc);
    if (row) p.vs = p.os = p.fs = row;
    p.out = reinterpret_cast<T*>(out.data_ptr());
    if (counts.defined()) {
      const int64_t NB = gather_buckets(value.size(0), geo.H, geo.W, geo.G), items = geo.N * geo.G * geo.K;
      TORCH_CHECK(fused, "msdcn_cuda: only the fused forward buckets the points");
      p.bucket_count = counts.data_ptr<int>();
      p.item_key = p.bucket_count + NB;
      p.item_rank = p.item_key + items;
      C10_CUDA_CHECK(cudaMemsetAsync(p.bucket_count, 0, NB * sizeof(int), stream));
    }
    if (!counts.defined() && plane_serves(value.size(0), geo.H, geo.W, geo.G, geo.C, geo.K, sizeof(T), sizeof(A), false, value.get_device())) {
      const PlaneLayout lay = plane_layout(geo.H, geo.W, geo.C, geo.K, sizeof(T), sizeof(A), false);
      auto plane = plane_kernel_forward<T, F, A>(fused, lay);
      allow_smem(plane, lay.bytes, value.get_device(), geo);
      plane<<<static_cast<unsigned>(value.size(0) * geo.G), plane_threads(lay.bytes, 0, 0, nullptr, false, value.get_device()), lay.bytes,
                                                                  stream>>>(p, lay);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const size_t smem = per_query * geo.Q;
    auto kernel = !fused ? msdcn_forward_kernel<T, F, A, false> : counts.defined() ? msdcn_forward_kernel<T, F, A, true, true>
                                                                                   : msdcn_forward_kernel<T, F, A, true>;
    allow_smem(kernel, smem, value.get_device(), geo);
    kernel<<<geo.blocks, geo.threads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The packed layout: proj [B, H, W, R], R = G*C + 4*G*K, each pixel's row value (G*C, (g, c)) | delta (2*G*K, (g, k, xy)) |
// scale_logit (G*K) | weights (G*K): one GEMM's output, read in place (no split copies) and its grad written in place
// (no concatenation). Views of the four parts with the shapes of the unpacked op (their data pointers and sizes are what
// the launchers read; the per-pixel stride R is passed separately).
struct Packed {
  at::Tensor value, delta, scale, weight;
  int64_t row;
};
Packed packed_views(const at::Tensor& proj, const at::Tensor& prior, const at::Tensor& s0, const at::Tensor& smax, int64_t G,
                    int64_t C, int64_t K) {
  TORCH_CHECK(proj.is_cuda(), "msdcn_cuda: proj must be a CUDA tensor");
  TORCH_CHECK(proj.dim() == 4, errmsg("msdcn_cuda: proj must be [B, H, W, G*C + 4*G*K], got ", proj.dim(), " dims"));
  TORCH_CHECK(G >= 1 && C >= 1 && K >= 1, errmsg("msdcn_cuda: groups, channels and points must be >= 1, got ", G, ", ", C, ", ", K));
  const int64_t R = G * C + 4 * G * K;
  TORCH_CHECK(proj.size(3) == R, errmsg("msdcn_cuda: proj has ", proj.size(3), " channels, expected G*C + 4*G*K = ", R, " (G=", G,
                                        ", C=", C, ", K=", K, ")"));
  TORCH_CHECK(proj.is_contiguous(), "msdcn_cuda: proj must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(proj.data_ptr()) % 16 == 0 && (R * proj.element_size()) % 16 == 0,
              errmsg("msdcn_cuda: proj rows must be 16-byte aligned (row of ", R * proj.element_size(), " bytes)"));
  const auto adt = proj.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&prior, &s0, &smax}) {
    check_cuda(*t, t == &prior ? "prior" : t == &s0 ? "s0" : "s_max", proj);
    TORCH_CHECK(t->scalar_type() == adt, errmsg("msdcn_cuda: prior, s0 and s_max must be ", adt));
  }
  check_consts(prior, s0, smax, G, K);
  const int64_t B = proj.size(0), H = proj.size(1), W = proj.size(2), o = proj.storage_offset();
  const int64_t sb = H * W * R, sh = W * R;
  Packed v;
  v.row = R;
  v.value = proj.as_strided({B, H, W, G, C}, {sb, sh, R, C, 1}, o);
  v.delta = proj.as_strided({B, H, W, G, K, 2}, {sb, sh, R, 2 * K, 2, 1}, o + G * C);
  v.scale = proj.as_strided({B, H, W, G, K}, {sb, sh, R, K, 1}, o + G * C + 2 * G * K);
  v.weight = proj.as_strided({B, H, W, G, K}, {sb, sh, R, K, 1}, o + G * C + 3 * G * K);
  return v;
}

}  // namespace

// out = msdcn(value, off, weight) (fused=false) or msdcn(value, deform(delta=off, scale, prior, s0, smax), weight).
at::Tensor msdcn_forward(const at::Tensor& value, const at::Tensor& off, const at::Tensor& scale, const at::Tensor& weight,
                         const at::Tensor& prior, const at::Tensor& s0, const at::Tensor& smax, bool fused, bool trunc,
                         int64_t threads, int64_t rounds) {
  check_all(value, off, scale, weight, prior, s0, smax, fused);
  return forward_launch(value, off, scale, weight, prior, s0, smax, fused, trunc, threads, rounds, 0);
}

// The fused forward on the packed projection (see packed_views): out [B, H, W, G, C].
at::Tensor msdcn_forward_packed(const at::Tensor& proj, const at::Tensor& prior, const at::Tensor& s0, const at::Tensor& smax,
                                int64_t G, int64_t C, int64_t K, bool trunc, int64_t threads, int64_t rounds) {
  const Packed v = packed_views(proj, prior, s0, smax, G, C, K);
  return forward_launch(v.value, v.delta, v.scale, v.weight, prior, s0, smax, true, trunc, threads, rounds, v.row);
}

// The training forward: [out, the gather backward's bucketing (int32 [count | key | rank], gather_count_words)], counted
// in the forward kernel where the point geometry is computed anyway, so the backward skips its count kernel. Costs 8
// bytes per sampling point kept from forward to backward.
std::vector<at::Tensor> msdcn_forward_packed_train(const at::Tensor& proj, const at::Tensor& prior, const at::Tensor& s0,
                                                   const at::Tensor& smax, int64_t G, int64_t C, int64_t K, bool trunc,
                                                   int64_t threads, int64_t rounds) {
  const Packed v = packed_views(proj, prior, s0, smax, G, C, K);
  TORCH_CHECK(gather_serves(v.value, v.weight), errmsg("msdcn_cuda: the packed training forward needs a shape the gather backward ",
                                                      "serves (C <= 256, G*K <= 1024, fewer than 2^31 corner slots), got G=", G, ", C=", C, ", K=", K));
  const int64_t NB = gather_buckets(proj.size(0), proj.size(1), proj.size(2), G), items = v.weight.numel();
  auto counts = at::empty({gather_count_words(NB, items)}, proj.options().dtype(at::kInt));
  if (proj.numel() == 0) counts.zero_();  // (empty: the forward returns before counting)
  auto out = forward_launch(v.value, v.delta, v.scale, v.weight, prior, s0, smax, true, trunc, threads, rounds, v.row, counts);
  return {out, counts};
}

// [shared memory per block (opt-in), streaming multiprocessors] of a device: cuda.py's copy of the plane kernels' rule.
std::vector<int64_t> msdcn_device_limits(int64_t device) {
  return {static_cast<int64_t>(max_smem_per_block(static_cast<int>(device))), static_cast<int64_t>(sm_count(static_cast<int>(device)))};
}

// Whether the plane backward (backward=true) or forward serves a [B, H, W, G, C] value (itemsize bytes; fp64: fp64
// accumulation) with K points on device (plane_serves). cuda.py decides with its own copy of the rule (_plane_rule: shape
// arithmetic that torch.compile can trace); the GPU tests compare the two through this.
bool msdcn_plane_serves(int64_t B, int64_t H, int64_t W, int64_t G, int64_t C, int64_t K, int64_t itemsize, bool fp64,
                        int64_t device, bool backward) {
  return plane_serves(B, H, W, G, C, K, static_cast<size_t>(itemsize), fp64 ? 8 : 4, backward, static_cast<int>(device));
}

// variant: 0 scatter (fp32 atomics), 1 tiled scatter with an atomic window, 2 tiled with a sorted window,
// 3 gather (msdcn_gather.cuh; the scatter kernel runs where the gather one does not serve the shape); pull_vec_req: the
// gather pull's runs of 8 channels per lane, 0 = automatic (pull_runs()).
// Returns [grad_value (value's dtype from the gather variant, else the fp32/fp64 accumulation buffer),
//          grad_off (or delta), grad_scale (fused, else empty), grad_weight, d/ds0 [G] in fp32/fp64 (fused, else empty)].
std::vector<at::Tensor> msdcn_backward(const at::Tensor& gout, const at::Tensor& value, const at::Tensor& off,
                                       const at::Tensor& scale, const at::Tensor& weight, const at::Tensor& prior,
                                       const at::Tensor& s0, const at::Tensor& smax, bool fused, bool trunc,
                                       int64_t threads, int64_t rounds, bool split, bool lean, bool l1_pref,
                                       bool skip_value_grad, int64_t variant, int64_t tile_h, int64_t tile_w, int64_t radius,
                                       int64_t pull_vec_req) {
  check_all(value, off, scale, weight, prior, s0, smax, fused);
  check_cuda(gout, "grad_out", value);
  TORCH_CHECK(gout.sizes() == value.sizes() && gout.scalar_type() == value.scalar_type(),
              "msdcn_cuda: grad_out must match value in shape and dtype");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(gout.data_ptr()) % 16 == 0, "msdcn_cuda: grad_out must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(value.device());
  const auto adt = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(variant >= 0 && variant <= 3, errmsg("msdcn_cuda: backward variant must be 0 (scatter), 1 (tiled, atomic window), ",
                                                  "2 (tiled, sorted window) or 3 (gather), got ", variant));
  // the gather variant: the plane backward where it serves (it has no limit on C), else the gather backward
  const bool plane = variant == 3 && plane_serves(value.size(0), value.size(1), value.size(2), value.size(3), value.size(4),
                                                  weight.size(4), value.element_size(), value.scalar_type() == at::kDouble ? 8 : 4,
                                                  true, value.get_device());
  const bool gather = plane || (variant == 3 && gather_serves(value, weight));
  at::Tensor gvalue;
  if (value.numel() == 0 || weight.numel() == 0 || !gather) gvalue = at::zeros(value.sizes(), value.options().dtype(adt));
  auto goff = at::empty_like(off);
  auto gweight = at::empty_like(weight);
  auto gscale = fused ? at::empty_like(scale) : at::empty({0}, weight.options());
  if (value.numel() == 0 || weight.numel() == 0) {
    goff.zero_(); gweight.zero_();
    if (fused) gscale.zero_();
    auto gs0 = fused ? at::zeros({value.size(3)}, value.options().dtype(adt)) : at::empty({0}, value.options().dtype(adt));
    return {gvalue, goff, gscale, gweight, gs0};  // d/ds0 [G], as the other paths return it
  }
  // grad_value's fp32 sums have no fixed order (scatter: float atomics; gather: bucket order from integer atomics):
  // under torch.use_deterministic_algorithms this raises (or warns with warn_only), as PyTorch's own
  // non-deterministic CUDA kernels do.
  if (gather)
    at::globalContext().alertNotDeterministic("msdcn_backward (CUDA MSDCN kernels: grad_value summed in bucket order set by atomics)");
  else if (!skip_value_grad)
    at::globalContext().alertNotDeterministic("msdcn_backward (CUDA MSDCN kernels: grad_value accumulated with fp32 atomics)");
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor s0p;
  FLOWDCN_DISPATCH(value.scalar_type(), weight.scalar_type(), "msdcn_backward", [&] {
    const int64_t G = value.size(3), K = weight.size(4), L = value.size(4) / kVec;
    const int S = (4 * static_cast<int>(K)) | 1;
    const size_t per_query = static_cast<size_t>(G * K) * (sizeof(PointGeo<A>) + sizeof(A)) + static_cast<size_t>(G * L) * S * sizeof(A);
    const Geometry geo = geometry(value, weight, threads, rounds, per_query);
    auto p = make_params<T, F, A>(geo, value, off, scale, weight, prior, s0, smax, fused, trunc);
    p.gout = reinterpret_cast<const T*>(gout.data_ptr());
    p.skip_value_grad = skip_value_grad;
    p.split = split;
    p.goff = reinterpret_cast<F*>(goff.data_ptr());
    p.gweight = reinterpret_cast<F*>(gweight.data_ptr());
    if (fused) p.gscale = reinterpret_cast<F*>(gscale.data_ptr());
    if (gather) {
      gvalue = at::empty_like(value);
      T* gv = reinterpret_cast<T*>(gvalue.data_ptr());
      s0p = plane ? plane_backward<T, F, A>(p, fused, value, gv, stream)
                  : gather_backward<T, F, A>(p, fused, value, gv, pull_vec_req, stream);
      return;
    }
    p.gvalue = reinterpret_cast<A*>(gvalue.data_ptr());
    s0p = fused ? at::empty({geo.blocks, geo.G}, value.options().dtype(adt)) : at::empty({0}, value.options().dtype(adt));
    if (fused) p.s0_part = reinterpret_cast<A*>(s0p.data_ptr());
    const bool tiled = variant == 1 || variant == 2, sorted = variant == 2;
    TileShape ts{};
    if (tiled && tiled_shape(geo, tile_h, tile_w, radius, sizeof(A), sizeof(PointGeo<A>), sorted, value.get_device(), ts)) {
      const int th = static_cast<int>((static_cast<int64_t>(ts.P) * geo.L + 31) / 32 * 32);  // whole warps
      const size_t smem = tiled_smem(geo, ts, th, sizeof(A), sizeof(PointGeo<A>), sorted);
      const int64_t blocks = value.size(0) * ts.tiles_y * ts.tiles_x;
      TORCH_CHECK(blocks < (int64_t(1) << 31), errmsg("msdcn_cuda: too many tiles for one launch: ", blocks));
      s0p = fused ? at::empty({blocks, geo.G}, value.options().dtype(adt)) : at::empty({0}, value.options().dtype(adt));
      if (fused) p.s0_part = reinterpret_cast<A*>(s0p.data_ptr());
      auto kernel = fused ? (sorted ? msdcn_backward_tiled_kernel<T, F, A, true, true> : msdcn_backward_tiled_kernel<T, F, A, true, false>)
                          : (sorted ? msdcn_backward_tiled_kernel<T, F, A, false, true> : msdcn_backward_tiled_kernel<T, F, A, false, false>);
      allow_smem(kernel, smem, value.get_device(), geo);
      if (l1_pref) prefer_l1(kernel, th, smem, value.get_device());
      kernel<<<dim3(static_cast<unsigned>(blocks), geo.G), th, smem, stream>>>(p, ts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;  // else (shape not served by the tiled kernel) the untiled kernel below runs
    }
    const size_t smem = per_query * geo.Q;
    auto kernel = fused ? msdcn_backward_kernel<T, F, A, true> : msdcn_backward_kernel<T, F, A, false>;
    if (lean && geo.threads <= 256)
      kernel = fused ? msdcn_backward_kernel<T, F, A, true, 256, 3> : msdcn_backward_kernel<T, F, A, false, 256, 3>;
    allow_smem(kernel, smem, value.get_device(), geo);
    if (l1_pref) prefer_l1(kernel, geo.threads, smem, value.get_device());
    kernel<<<geo.blocks, geo.threads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // d/ds0: the gather backward returns it summed; the scatter kernels' block partials [blocks, G] are summed here.
  return {gvalue, goff, gscale, gweight, fused && !gather ? s0p.sum(0) : s0p};
}

// Backward of msdcn_forward_packed through the gather backward: [grad of proj (proj's dtype and layout; every element
// written), d/ds0 [G] in fp32/fp64]. Shapes the gather backward does not serve are rejected (cuda.py then uses the
// unpacked op).
// counted: the training forward's bucketing (msdcn_forward_packed_train), or an empty tensor (then counted here).
std::vector<at::Tensor> msdcn_backward_packed(const at::Tensor& gout, const at::Tensor& proj, const at::Tensor& prior,
                                              const at::Tensor& s0, const at::Tensor& smax, int64_t G, int64_t C, int64_t K,
                                              bool trunc, int64_t pull_vec_req, const at::Tensor& counted) {
  const Packed v = packed_views(proj, prior, s0, smax, G, C, K);
  check_cuda(gout, "grad_out", proj);
  TORCH_CHECK(gout.sizes() == v.value.sizes() && gout.scalar_type() == proj.scalar_type(),
              "msdcn_cuda: grad_out must be [B, H, W, G, C] in proj's dtype");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(gout.data_ptr()) % 16 == 0, "msdcn_cuda: grad_out must be 16-byte aligned");
  TORCH_CHECK(gather_serves(v.value, v.weight), errmsg("msdcn_cuda: the packed backward needs a shape the gather backward serves (C <= 256, ",
                                                      "G*K <= 1024, fewer than 2^31 corner slots), got G=", G, ", C=", C, ", K=", K));
  const c10::cuda::CUDAGuard guard(proj.device());
  const auto adt = proj.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto gproj = at::empty_like(proj);
  if (proj.numel() == 0) return {gproj, at::zeros({G}, proj.options().dtype(adt))};
  at::globalContext().alertNotDeterministic("msdcn_backward (CUDA MSDCN kernels: grad_value summed in bucket order set by atomics)");
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor s0p;
  FLOWDCN_DISPATCH(proj.scalar_type(), proj.scalar_type(), "msdcn_backward_packed", [&] {
    // One tensor: the dispatch on (proj, proj) takes only pairs with F == T (the casts below are identities there).
    const Geometry geo = geometry(v.value, v.weight, kGatherThreads, 1, 0);  // checks C and G*C/8; Q, R unused here
    auto p = make_params<T, F, A>(geo, v.value, v.delta, v.scale, v.weight, prior, s0, smax, true, trunc);
    p.vs = p.os = p.fs = v.row;
    T* g = reinterpret_cast<T*>(gproj.data_ptr());
    p.gout = reinterpret_cast<const T*>(gout.data_ptr());
    p.goff = reinterpret_cast<F*>(g + G * C);
    p.gscale = reinterpret_cast<F*>(g + G * C + 2 * G * K);
    p.gweight = reinterpret_cast<F*>(g + G * C + 3 * G * K);
    if (counted.numel() > 0) check_cuda(counted, "the forward's bucketing", proj);
    // the plane backward needs no bucketing: a forward's, if any, goes unused
    const bool plane = plane_serves(v.value.size(0), p.H, p.W, p.G, p.C, p.K, sizeof(T), sizeof(A), true, proj.get_device());
    s0p = plane ? plane_backward<T, F, A>(p, true, v.value, g, stream)
                : gather_backward<T, F, A>(p, true, v.value, g, pull_vec_req, stream, counted);
  });
  return {gproj, s0p};
}

}  // namespace flowdcn
