// The thin torch binding of the scan: checks what the kernel assumes, fills ScanParams, launches.
//
// Includes no torch CUDA header: the CUDA stream comes in from Python as an integer
// (torch.cuda.current_stream().cuda_stream), and Python selects the device. Outputs are allocated
// by the caller (cuda.py), so the tests can poison them with NaN.

#include <torch/extension.h>

#include <optional>
#include <string>

#include "dfw_scan.h"

namespace {

using at::Tensor;
using std::optional;

dfw::ScalarType scalar_type(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return dfw::ScalarType::Float32;
    case at::kBFloat16:
      return dfw::ScalarType::BFloat16;
    case at::kHalf:
      return dfw::ScalarType::Float16;
    default:
      TORCH_CHECK(false, "dfw_kernels: q, k, v must be float32, bfloat16 or float16, got ", x.scalar_type(),
                  "; cast them (or use kernel='torch')");
  }
}

void check_tensor(const Tensor& x, const char* name, const Tensor& like, at::IntArrayRef shape,
                  optional<at::ScalarType> dtype, bool contiguous) {
  TORCH_CHECK(x.is_cuda(), "dfw_kernels: ", name, " must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.device() == like.device(), "dfw_kernels: ", name, " is on ", x.device(), " but q is on ",
              like.device(), "; move it to q's device");
  TORCH_CHECK(x.sizes() == shape, "dfw_kernels: ", name, " must have shape ", shape, ", got ", x.sizes());
  if (dtype) {
    TORCH_CHECK(x.scalar_type() == *dtype, "dfw_kernels: ", name, " must be ", *dtype, ", got ", x.scalar_type(),
                "; cast it");
  }
  if (contiguous) {
    TORCH_CHECK(x.is_contiguous(), "dfw_kernels: ", name, " must be contiguous; call .contiguous()");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "dfw_kernels: ", name,
                " must be 16-byte aligned; call .clone()");
  }
}

void set_strides(const Tensor& x, int64_t* strides) {
  for (int d = 0; d < 4; ++d) strides[d] = x.stride(d);
}

void scan(const Tensor& q, const Tensor& k, const Tensor& v, const optional<Tensor>& log_key_gate,
          const optional<Tensor>& log_value_gate, const optional<Tensor>& initial_state,
          const optional<Tensor>& final_state, const optional<Tensor>& final_pre_state, const optional<Tensor>& out,
          const optional<Tensor>& out_pre, const optional<Tensor>& gate_grad, const optional<Tensor>& gate_grad_x1,
          const optional<Tensor>& gate_grad_x2, const optional<Tensor>& gate_grad_start, bool reverse,
          int64_t stream) {
  TORCH_CHECK(q.dim() == 4, "dfw_kernels: q must be [B, T, H, K], got shape ", q.sizes());
  TORCH_CHECK(v.dim() == 4, "dfw_kernels: v must be [B, T, H, V], got shape ", v.sizes());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  const auto dtype = q.scalar_type();
  const auto f32 = at::kFloat;
  for (const auto [dim, name] : {std::pair{K, "K (q's last dimension)"}, std::pair{V, "V (v's last dimension)"}}) {
    TORCH_CHECK(dim > 0 && dim <= dfw::kMaxStateDim && dim % dfw::kStateDimMultiple == 0, "dfw_kernels: ", name,
                " must be a multiple of ", dfw::kStateDimMultiple, " in [", dfw::kStateDimMultiple, ", ",
                dfw::kMaxStateDim, "], got ", dim, "; zero-pad it (decay_fast_weights does)");
  }
  TORCH_CHECK(B <= 65535 && H <= 65535 && T <= INT32_MAX, "dfw_kernels: B and H must be <= 65535, got ", B, ", ", H);
  scalar_type(q);
  check_tensor(q, "q", q, {B, T, H, K}, dtype, true);
  check_tensor(k, "k", q, {B, T, H, K}, dtype, true);
  check_tensor(v, "v", q, {B, T, H, V}, dtype, true);

  dfw::ScanParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.B = static_cast<int>(B);
  p.T = static_cast<int>(T);
  p.H = static_cast<int>(H);
  p.K = static_cast<int>(K);
  p.V = static_cast<int>(V);
  p.reverse = reverse;
  if (log_key_gate) {
    check_tensor(*log_key_gate, "log_key_gate", q, {B, T, H, K}, f32, true);
    p.log_key_gate = log_key_gate->data_ptr<float>();
  }
  if (log_value_gate) {
    check_tensor(*log_value_gate, "log_value_gate", q, {B, T, H, V}, f32, true);
    p.log_value_gate = log_value_gate->data_ptr<float>();
  }
  if (initial_state) {
    check_tensor(*initial_state, "initial_state", q, {B, H, K, V}, f32, false);
    p.initial_state = initial_state->data_ptr<float>();
    set_strides(*initial_state, p.initial_state_strides);
  }
  if (final_state) {
    check_tensor(*final_state, "final_state", q, {B, H, K, V}, f32, false);
    p.final_state = final_state->data_ptr<float>();
    set_strides(*final_state, p.final_state_strides);
  }
  if (final_pre_state) {
    check_tensor(*final_pre_state, "final_pre_state", q, {B, H, K, V}, f32, false);
    p.final_pre_state = final_pre_state->data_ptr<float>();
    set_strides(*final_pre_state, p.final_pre_state_strides);
  }
  if (out) {
    check_tensor(*out, "out", q, {B, T, H, V}, dtype, true);
    p.out = out->data_ptr();
  }
  if (out_pre) {
    check_tensor(*out_pre, "out_pre", q, {B, T, H, V}, f32, true);
    p.out_pre = out_pre->data_ptr<float>();
  }
  if (gate_grad) {
    TORCH_CHECK(gate_grad_x1 && gate_grad_x2, "dfw_kernels: gate_grad needs gate_grad_x1 and gate_grad_x2");
    check_tensor(*gate_grad, "gate_grad", q, {B, T, H, V}, f32, true);
    check_tensor(*gate_grad_x1, "gate_grad_x1", q, {B, T, H, V}, f32, true);
    check_tensor(*gate_grad_x2, "gate_grad_x2", q, {B, T, H, V}, dtype, true);
    p.gate_grad = gate_grad->data_ptr<float>();
    p.gate_grad_x1 = gate_grad_x1->data_ptr<float>();
    p.gate_grad_x2 = gate_grad_x2->data_ptr();
    if (gate_grad_start) {
      check_tensor(*gate_grad_start, "gate_grad_start", q, {B, H, V}, f32, true);
      p.gate_grad_start = gate_grad_start->data_ptr<float>();
    }
  }
  const int err = dfw::scan(p, scalar_type(q), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "dfw_kernels: the scan kernel failed to launch: ", dfw::error_string(err),
              " (B=", B, ", T=", T, ", H=", H, ", K=", K, ", V=", V, ", dtype=", dtype, ")");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Decaying fast weights: the fused recurrent scan (see dfw_kernels/closed_form.py).";
  m.def("scan", &scan, "The gated outer-product scan; outputs preallocated by the caller.", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("log_key_gate"), py::arg("log_value_gate"), py::arg("initial_state"),
        py::arg("final_state"), py::arg("final_pre_state"), py::arg("out"), py::arg("out_pre"),
        py::arg("gate_grad"), py::arg("gate_grad_x1"), py::arg("gate_grad_x2"), py::arg("gate_grad_start"),
        py::arg("reverse"), py::arg("stream"));
}
