// The fused recurrent scan of decaying fast weights: the state on chip in float32, never in memory.
//
// One thread block per (batch, head, tile of BV state columns). A warp holds 4 columns; the 8 lanes
// of a column split its KP rows (R = KP / 8 each, in registers). Each step reads the token's q, k,
// log-gates and v from shared memory, decays and updates its R state entries, and reduces q_t S over
// the 8 lanes with 3 shuffles. Tokens arrive in chunks of TC steps, copied global -> shared with
// cp.async into two buffers, so the copy of chunk c+1 overlaps the recurrence over chunk c; outputs
// are staged in shared memory and written once per chunk, coalesced.
//
// Runs on sm_80+ (cp.async; older GPUs compile a synchronous copy instead). Includes no torch header: `nvcc -c` compiles this file on its own.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dfw_scan.h"

namespace dfw {
namespace {

// ---------------------------------------------------------------------------------------------
// Element types: float, bf16, fp16 in memory; float in registers.

template <typename E>
struct Element;

template <>
struct Element<float> {
  using Pair = float2;
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
  static __device__ __forceinline__ float2 pair_to_float2(float2 x) { return x; }
};

template <>
struct Element<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float2 pair_to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
};

template <>
struct Element<__half> {
  using Pair = __half2;
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float2 pair_to_float2(__half2 x) { return __half22float2(x); }
};

// Two consecutive elements (aligned to two elements) as float2.
template <typename E>
__device__ __forceinline__ float2 load_pair(const E* p) {
  return Element<E>::pair_to_float2(*reinterpret_cast<const typename Element<E>::Pair*>(p));
}

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80+): 16 bytes global -> shared, zero-filled when src_bytes == 0.
//
// Older GPUs (sm_75 and below: a wider TORCH_CUDA_ARCH_LIST compiles for them too) have no cp.async:
// there the same calls copy synchronously (one 16-byte load and store) and commit/wait do nothing;
// every read of shared memory already follows a __syncthreads(). The Python side runs the kernel on
// compute capability 8.0+ only (cuda.unavailable_reason), so this branch only has to compile.

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define DFW_HAS_CP_ASYNC 0
#else
#define DFW_HAS_CP_ASYNC 1
#endif

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#if DFW_HAS_CP_ASYNC
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
#else
  *static_cast<int4*>(smem) = src_bytes != 0 ? *static_cast<const int4*>(gmem) : make_int4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if DFW_HAS_CP_ASYNC
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if DFW_HAS_CP_ASYNC
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Copies rows t = t_first + dir * tau (tau < rows) of a [B, T, H, D] tensor, columns
// [col0, col0 + width), into dst[tau][0 .. width). Rows outside [0, T), columns at or past `valid`
// (counted from col0) and a null `src` are zero-filled. `any` is a valid global address, never read.
template <typename E>
__device__ __forceinline__ void load_tile(E* dst, int width, const E* src, int D, int col0, int valid,
                                          int b, int h, int H, int T, int t_first, int dir, int rows,
                                          const void* any) {
  constexpr int kPer = 16 / sizeof(E);
  const int pieces = width / kPer;
  for (int e = threadIdx.x; e < rows * pieces; e += blockDim.x) {
    const int tau = e / pieces;
    const int col = (e - tau * pieces) * kPer;
    const int t = t_first + dir * tau;
    const bool ok = src != nullptr && t >= 0 && t < T && col < valid;
    const void* from = ok ? static_cast<const void*>(src + ((int64_t(b) * T + t) * H + h) * D + col0 + col) : any;
    cp_async_16(dst + tau * width + col, from, ok ? 16 : 0);
  }
}

// Tokens per chunk: chosen so that two buffers fit 4 blocks per SM for bf16 at KP = 64.
__host__ __device__ constexpr int chunk_len(int KP) { return KP >= 128 ? 16 : 32; }

template <typename E, int KP, int BV>
struct Layout {
  static constexpr int TC = chunk_len(KP);
  static constexpr int kRowE = TC * KP * sizeof(E);  // q or k of a chunk
  static constexpr int kRowF = TC * KP * 4;          // the key-side gates of a chunk
  static constexpr int kColE = TC * BV * sizeof(E);  // v or x2
  static constexpr int kColF = TC * BV * 4;          // the value-side gates or x1
  // One buffer: q, k, key gates, v, x2, value gates, x1 (every offset a multiple of 16 bytes).
  static constexpr int kQ = 0, kK = kRowE, kA = 2 * kRowE, kV = kA + kRowF, kX2 = kV + kColE;
  static constexpr int kB = kX2 + kColE, kX1 = kB + kColF, kBuffer = kX1 + kColF;
  // After the two buffers: q.k per step, then out, out_pre and gate_grad staged per chunk.
  static constexpr int kQK = 2 * kBuffer, kOut = kQK + TC * 4, kPre = kOut + kColF, kGG = kPre + kColF;
  static constexpr int kBytes = kGG + kColF;
  static_assert(kRowE % 16 == 0 && kColE % 16 == 0 && (TC * 4) % 16 == 0, "16-byte aligned sections");
};

template <typename E, int KP, int BV>
__global__ void __launch_bounds__(BV * 8) scan_kernel(const ScanParams p) {
  using L = Layout<E, KP, BV>;
  using El = Element<E>;
  constexpr int TC = L::TC;
  constexpr int R = KP / 8;  // state rows per thread
  constexpr int kThreads = BV * 8;
  static_assert(KP % 16 == 0 && BV % 4 == 0, "KP a multiple of 16, BV of 4");

  extern __shared__ __align__(16) unsigned char smem[];
  const int B = p.B, T = p.T, H = p.H, K = p.K, V = p.V;
  const int j0 = blockIdx.x * BV, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, l = lane & 7;
  const int jl = (tid >> 5) * 4 + (lane >> 3);  // this thread's column in the tile
  const int j = j0 + jl;
  const bool col_ok = j < V;
  const int valid_cols = V - j0;  // a positive multiple of 8
  (void)B;

  // Rows of this thread: pairs of adjacent rows, lanes interleaved, so that a warp's pair loads
  // from shared memory touch consecutive words (no bank conflicts; the 4 columns broadcast).
  auto row = [&](int r) { return (r >> 1) * 16 + 2 * l + (r & 1); };

  float S[R], P[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = row(r);
    S[r] = (p.initial_state != nullptr && i < K && col_ok)
               ? p.initial_state[b * p.initial_state_strides[0] + h * p.initial_state_strides[1] +
                                 i * p.initial_state_strides[2] + j * p.initial_state_strides[3]]
               : 0.f;
    P[r] = S[r];
  }
  const bool gate_grad = p.gate_grad != nullptr;
  float run = (gate_grad && p.gate_grad_start != nullptr && col_ok) ? p.gate_grad_start[(int64_t(b) * H + h) * V + j]
                                                                    : 0.f;

  const int dir = p.reverse ? -1 : 1;
  const int gate_shift = p.reverse ? 1 : 0;  // reverse: the gate of t+1 decays before the write at t
  const int n_chunks = (T + TC - 1) / TC;
  const void* any = p.q;
  auto first_t = [&](int c) { return p.reverse ? T - 1 - c * TC : c * TC; };
  auto issue = [&](int c, int buf) {
    unsigned char* base = smem + buf * L::kBuffer;
    const int t0 = first_t(c);
    load_tile(reinterpret_cast<E*>(base + L::kQ), KP, static_cast<const E*>(p.q), K, 0, K, b, h, H, T, t0, dir, TC, any);
    load_tile(reinterpret_cast<E*>(base + L::kK), KP, static_cast<const E*>(p.k), K, 0, K, b, h, H, T, t0, dir, TC, any);
    load_tile(reinterpret_cast<float*>(base + L::kA), KP, p.log_key_gate, K, 0, K, b, h, H, T, t0 + gate_shift,
              dir, TC, any);
    load_tile(reinterpret_cast<E*>(base + L::kV), BV, static_cast<const E*>(p.v), V, j0, valid_cols, b, h, H, T, t0,
              dir, TC, any);
    load_tile(reinterpret_cast<float*>(base + L::kB), BV, p.log_value_gate, V, j0, valid_cols, b, h, H, T,
              t0 + gate_shift, dir, TC, any);
    if (gate_grad) {
      load_tile(reinterpret_cast<float*>(base + L::kX1), BV, p.gate_grad_x1, V, j0, valid_cols, b, h, H, T, t0, dir,
                TC, any);
      load_tile(reinterpret_cast<E*>(base + L::kX2), BV, static_cast<const E*>(p.gate_grad_x2), V, j0, valid_cols, b,
                h, H, T, t0, dir, TC, any);
    }
    cp_async_commit();
  };

  float* qk_s = reinterpret_cast<float*>(smem + L::kQK);
  float* out_s = reinterpret_cast<float*>(smem + L::kOut);
  float* pre_s = reinterpret_cast<float*>(smem + L::kPre);
  float* gg_s = reinterpret_cast<float*>(smem + L::kGG);

  if (n_chunks > 0) issue(0, 0);
  for (int c = 0; c < n_chunks; ++c) {
    const int buf = c & 1;
    if (c + 1 < n_chunks) {
      issue(c + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // chunk c is in shared memory; the write-back of chunk c-1 is done

    unsigned char* base = smem + buf * L::kBuffer;
    const E* qs = reinterpret_cast<const E*>(base + L::kQ);
    const E* ks = reinterpret_cast<const E*>(base + L::kK);
    float* as = reinterpret_cast<float*>(base + L::kA);
    const E* vs = reinterpret_cast<const E*>(base + L::kV);
    float* bs = reinterpret_cast<float*>(base + L::kB);
    const float* x1s = reinterpret_cast<const float*>(base + L::kX1);
    const E* x2s = reinterpret_cast<const E*>(base + L::kX2);

    // Log-gates -> gates, in place (expf, not __expf: its error would compound over thousands of
    // steps of gates near 1), and q_t . k_t per step (one warp per step, shuffle reduction).
    for (int e = tid; e < TC * KP; e += kThreads) as[e] = expf(as[e]);
    for (int e = tid; e < TC * BV; e += kThreads) bs[e] = expf(bs[e]);
    for (int tau = tid >> 5; tau < TC; tau += kThreads / 32) {
      float s = 0.f;
      for (int i = lane; i < KP; i += 32) s = fmaf(El::to_float(qs[tau * KP + i]), El::to_float(ks[tau * KP + i]), s);
#pragma unroll
      for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
      if (lane == 0) qk_s[tau] = s;
    }
    __syncthreads();

    const int n_valid = min(TC, T - c * TC);
    for (int tau = 0; tau < n_valid; ++tau) {
      const E* q_row = qs + tau * KP;
      const E* k_row = ks + tau * KP;
      const float* a_row = as + tau * KP;
      const float vj = El::to_float(vs[tau * BV + jl]);
      const float bj = bs[tau * BV + jl];
      float pre = 0.f;
#pragma unroll
      for (int pr = 0; pr < R / 2; ++pr) {
        const int i = pr * 16 + 2 * l;
        const float2 qf = load_pair(q_row + i);
        const float2 kf = load_pair(k_row + i);
        const float2 af = *reinterpret_cast<const float2*>(a_row + i);
        P[2 * pr] = S[2 * pr] * af.x * bj;
        P[2 * pr + 1] = S[2 * pr + 1] * af.y * bj;
        pre = fmaf(qf.x, P[2 * pr], pre);
        pre = fmaf(qf.y, P[2 * pr + 1], pre);
        S[2 * pr] = fmaf(kf.x, vj, P[2 * pr]);
        S[2 * pr + 1] = fmaf(kf.y, vj, P[2 * pr + 1]);
      }
      pre += __shfl_xor_sync(0xffffffffu, pre, 1);
      pre += __shfl_xor_sync(0xffffffffu, pre, 2);
      pre += __shfl_xor_sync(0xffffffffu, pre, 4);
      const float out = fmaf(qk_s[tau], vj, pre);  // q_t S_t = q_t P_t + (q_t . k_t) v_t
      // Reverse: the initial state is written at the first step, so nothing was read before it.
      const float pre_out = (p.reverse && c == 0 && tau == 0) ? 0.f : pre;
      if (gate_grad) {
        run = fmaf(x1s[tau * BV + jl], vj, run);
        run = fmaf(-El::to_float(x2s[tau * BV + jl]), pre_out, run);
      }
      if (l == 0) {
        out_s[tau * BV + jl] = out;
        pre_s[tau * BV + jl] = pre_out;
        gg_s[tau * BV + jl] = run;
      }
    }
    __syncthreads();  // staged outputs complete; buffer `buf` free for chunk c+2

    const int t0 = first_t(c);
    for (int e = tid; e < n_valid * BV; e += kThreads) {
      const int tau = e / BV, jj = j0 + (e - tau * BV);
      if (jj >= V) continue;
      const int64_t idx = ((int64_t(b) * T + (t0 + dir * tau)) * H + h) * V + jj;
      if (p.out != nullptr) static_cast<E*>(p.out)[idx] = El::from_float(out_s[e]);
      if (p.out_pre != nullptr) p.out_pre[idx] = pre_s[e];
      if (gate_grad) p.gate_grad[idx] = gg_s[e];
    }
  }

  if (!col_ok) return;
  if (p.reverse && T > 0) {  // one more decay: dS_0 = diag(a_0) G_0 diag(b_0)
    const float bj = p.log_value_gate != nullptr ? expf(p.log_value_gate[(int64_t(b) * T * H + h) * V + j]) : 1.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = row(r);
      const float ai =
          (p.log_key_gate != nullptr && i < K) ? expf(p.log_key_gate[(int64_t(b) * T * H + h) * K + i]) : 1.f;
      S[r] = S[r] * ai * bj;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = row(r);
    if (i >= K) continue;
    if (p.final_state != nullptr)
      p.final_state[b * p.final_state_strides[0] + h * p.final_state_strides[1] + i * p.final_state_strides[2] +
                    j * p.final_state_strides[3]] = S[r];
    if (p.final_pre_state != nullptr)
      p.final_pre_state[b * p.final_pre_state_strides[0] + h * p.final_pre_state_strides[1] +
                        i * p.final_pre_state_strides[2] + j * p.final_pre_state_strides[3]] = P[r];
  }
}

template <typename E, int KP, int BV>
cudaError_t launch(const ScanParams& p, cudaStream_t stream) {
  constexpr int bytes = Layout<E, KP, BV>::kBytes;
  auto* kernel = &scan_kernel<E, KP, BV>;
  if (bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((p.V + BV - 1) / BV, p.H, p.B);
  kernel<<<grid, BV * 8, bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename E, int KP>
cudaError_t launch_tile(const ScanParams& p, cudaStream_t stream) {
  // Wide tiles (4 warps) when there are enough blocks to fill the GPU twice; else narrow tiles
  // (2 warps) for twice the blocks: long sequences come in small batches.
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t wide_blocks = int64_t((p.V + 15) / 16) * p.H * p.B;
  if (p.V > 8 && wide_blocks >= 2 * int64_t(sms)) return launch<E, KP, 16>(p, stream);
  return launch<E, KP, 8>(p, stream);
}

template <typename E>
cudaError_t launch_dtype(const ScanParams& p, cudaStream_t stream) {
  if (p.K <= 16) return launch_tile<E, 16>(p, stream);
  if (p.K <= 32) return launch_tile<E, 32>(p, stream);
  if (p.K <= 64) return launch_tile<E, 64>(p, stream);
  return launch_tile<E, 128>(p, stream);
}

}  // namespace

int scan(const ScanParams& p, ScalarType dtype, void* stream) {
  if (p.K <= 0 || p.K > kMaxStateDim || p.V <= 0 || p.V > kMaxStateDim || p.K % kStateDimMultiple ||
      p.V % kStateDimMultiple || p.B < 0 || p.H < 0 || p.T < 0 || p.B > 65535 || p.H > 65535)
    return static_cast<int>(cudaErrorInvalidValue);
  if (p.B == 0 || p.H == 0) return 0;  // nothing to do
  // T = 0: no token is read (an empty tensor's data pointer is null); the final state is the initial one.
  if (p.q == nullptr && p.T > 0) return static_cast<int>(cudaErrorInvalidValue);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case ScalarType::Float32:
      return static_cast<int>(launch_dtype<float>(p, s));
    case ScalarType::BFloat16:
      return static_cast<int>(launch_dtype<__nv_bfloat16>(p, s));
    case ScalarType::Float16:
      return static_cast<int>(launch_dtype<__half>(p, s));
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace dfw
