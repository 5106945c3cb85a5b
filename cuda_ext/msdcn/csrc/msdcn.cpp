// Python bindings of the MSDCN CUDA launchers (registered as torch.library ops in cuda_ext/msdcn/cuda.py).
#include <torch/extension.h>

#include <vector>

namespace flowdcn {
at::Tensor msdcn_forward(const at::Tensor& value, const at::Tensor& off, const at::Tensor& scale, const at::Tensor& weight,
                         const at::Tensor& prior, const at::Tensor& s0, const at::Tensor& smax, bool fused, bool trunc, int64_t threads, int64_t rounds);
std::vector<at::Tensor> msdcn_backward(const at::Tensor& gout, const at::Tensor& value, const at::Tensor& off,
                                       const at::Tensor& scale, const at::Tensor& weight, const at::Tensor& prior,
                                       const at::Tensor& s0, const at::Tensor& smax, bool fused, bool trunc, int64_t threads,
                                       int64_t rounds, bool split, bool lean, bool l1_pref, bool skip_value_grad,
                                       int64_t variant, int64_t tile_h, int64_t tile_w, int64_t radius, int64_t pull_vec);
at::Tensor msdcn_forward_packed(const at::Tensor& proj, const at::Tensor& prior, const at::Tensor& s0, const at::Tensor& smax,
                                int64_t G, int64_t C, int64_t K, bool trunc, int64_t threads, int64_t rounds);
std::vector<at::Tensor> msdcn_forward_packed_train(const at::Tensor& proj, const at::Tensor& prior, const at::Tensor& s0,
                                                   const at::Tensor& smax, int64_t G, int64_t C, int64_t K, bool trunc,
                                                   int64_t threads, int64_t rounds);
std::vector<at::Tensor> msdcn_backward_packed(const at::Tensor& gout, const at::Tensor& proj, const at::Tensor& prior,
                                              const at::Tensor& s0, const at::Tensor& smax, int64_t G, int64_t C, int64_t K,
                                              bool trunc, int64_t pull_vec, const at::Tensor& counted);
bool msdcn_plane_serves(int64_t B, int64_t H, int64_t W, int64_t G, int64_t C, int64_t K, int64_t itemsize, bool fp64,
                        int64_t device, bool backward);
std::vector<int64_t> msdcn_device_limits(int64_t device);
}  // namespace flowdcn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FlowDCN MSDCN CUDA kernels (forward, backward; plain and with the fused deformable field)";
  m.def("forward", &flowdcn::msdcn_forward, "MSDCN forward (value, off|delta, scale_logit, weights, prior, s0, s_max, fused, trunc, threads, rounds)");
  m.def("forward_packed", &flowdcn::msdcn_forward_packed, "fused MSDCN forward on the packed projection (proj, prior, s0, s_max, G, C, K, trunc, threads, rounds)");
  m.def("forward_packed_train", &flowdcn::msdcn_forward_packed_train, "the same, also bucketing the points for the backward -> [out, bucketing]");
  m.def("backward_packed", &flowdcn::msdcn_backward_packed, "its gather backward (grad_out, proj, prior, s0, s_max, G, C, K, trunc, pull_vec, bucketing or empty) -> [grad_proj, grad_s0]");
  m.def("device_limits", &flowdcn::msdcn_device_limits, "[shared memory per block (opt-in), SMs] of a device");
  m.def("plane_serves", &flowdcn::msdcn_plane_serves, "whether a plane kernel serves (B, H, W, G, C, K, value itemsize, fp64, device, backward)");
  m.def("backward", &flowdcn::msdcn_backward, "MSDCN backward (grad_out, value, off|delta, scale_logit, weights, prior, s0, s_max, fused, trunc, threads, rounds, split, lean, l1_pref, skip_value_grad, variant, tile_h, tile_w, radius, pull_vec)");
}
