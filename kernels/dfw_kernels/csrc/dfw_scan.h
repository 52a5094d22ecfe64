// The one primitive of the CUDA fast-weight kernel: a gated outer-product scan (see closed_form.py).
//
//   reverse = false: for t = 0 .. T-1:  P = diag(a_t) S diag(b_t);      S = P + k_t^T v_t
//   reverse = true:  for t = T-1 .. 0:  P = diag(a_{t+1}) S diag(b_{t+1}); S = P + k_t^T v_t   (a_T = b_T = 1)
//                    the initial state counts as written at the first step (P = 0 there), and the
//                    final state gets one more decay, diag(a_0) S diag(b_0).
//   out_t = q_t S,  out_pre_t = q_t P,  a = exp(log_key_gate), b = exp(log_value_gate).
//   Gate-gradient epilogue: r = gate_grad_start; r += x1_t * v_t - x2_t * out_pre_t; gate_grad_t = r.
//
// The state lives in registers in float32 and never goes to global memory except as the initial and
// final states. This header is plain C++ (no torch, no CUDA headers): the .cu files include it and
// compile standalone with nvcc; the torch binding (binding.cpp) includes it to fill ScanParams.
#pragma once

#include <cstdint>

namespace dfw {

enum class ScalarType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// Sizes of the state [K, V] the kernel takes (K = attention.state_size, V = the head size): multiples
// of kStateDimMultiple up to kMaxStateDim (the Python side pads).
constexpr int kMaxStateDim = 128;
constexpr int kStateDimMultiple = 8;

struct ScanParams {
  // [B, T, H, K] (q, k) and [B, T, H, V] (v), contiguous, 16-byte aligned, of the ScalarType.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* log_key_gate = nullptr;    // [B, T, H, K] contiguous, or nullptr for gate 1
  const float* log_value_gate = nullptr;  // [B, T, H, V] contiguous, or nullptr for gate 1
  // States [B, H, K, V] in float32 with element strides {b, h, row, column}; each may be nullptr.
  // initial_state may equal final_state (in-place decode step): each thread reads its elements first.
  const float* initial_state = nullptr;
  int64_t initial_state_strides[4] = {0, 0, 0, 0};
  float* final_state = nullptr;
  int64_t final_state_strides[4] = {0, 0, 0, 0};
  float* final_pre_state = nullptr;  // P at the last step
  int64_t final_pre_state_strides[4] = {0, 0, 0, 0};
  // Outputs [B, T, H, V], contiguous; each may be nullptr.
  void* out = nullptr;         // q_t S_t in the ScalarType
  float* out_pre = nullptr;    // q_t P_t in float32
  float* gate_grad = nullptr;  // the epilogue's running sum; needs gate_grad_x1 and gate_grad_x2
  const float* gate_grad_x1 = nullptr;     // [B, T, H, V] float32
  const void* gate_grad_x2 = nullptr;      // [B, T, H, V] of the ScalarType
  const float* gate_grad_start = nullptr;  // [B, H, V] float32, or nullptr for 0
  int B = 0, T = 0, H = 0, K = 0, V = 0;
  bool reverse = false;
};

// Launches the scan on `stream` (a cudaStream_t; nullptr for the default stream) on the current
// device. Returns 0 on success, else a cudaError_t code (see error_string).
int scan(const ScanParams& params, ScalarType dtype, void* stream);

const char* error_string(int code);

}  // namespace dfw
