#include <cuda_fp16.h>
#define KV_SHARED __shared__
#define KV_TG
#define KV_DEV
#define KV_BARRIER() __syncthreads()
// exp(x) = 2^(x log2 e) on the MUFU unit, denormal results flushed to zero (__expf adds a
// denormal-safe range check: ~6 more instructions per call in the decode loop).
__device__ __forceinline__ float kv_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}
#define KV_EXP(x) kv_exp(x)
#define KV_MAX(a, b) fmaxf(a, b)
#define KV_MIN(a, b) min(a, b)
#define KV_IMAX(a, b) ((a) > (b) ? (a) : (b))
#define KV_SQRT(x) sqrtf(x)
#define KV_H2F(x) __half2float(x)
#define KV_NEG_INF (__int_as_float(0xff800000))
__device__ __forceinline__ float kv_warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float kv_warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
#define KV_WARP_MAX(x) kv_warp_max(x)
#define KV_WARP_SUM(x) kv_warp_sum(x)
#define KV_SHFL_XOR(x, o) __shfl_xor_sync(0xffffffffu, x, o)
#define KV_WARP_ANY(p) __any_sync(0xffffffffu, p)
#define KV_DEVICE_FENCE() __threadfence()
#define KV_ATOMIC_INC(p, i) atomicAdd((unsigned int*)(p) + (i), 1u)
