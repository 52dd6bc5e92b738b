#define KV_SHARED threadgroup
#define KV_TG threadgroup
#define KV_DEV device
#define KV_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define KV_WARP_MAX(x) simd_max(x)
#define KV_WARP_SUM(x) simd_sum(x)
#define KV_EXP(x) metal::exp(x)
#define KV_MAX(a, b) metal::max(a, b)
#define KV_MIN(a, b) metal::min(a, b)
#define KV_IMAX(a, b) ((a) > (b) ? (a) : (b))
#define KV_SQRT(x) metal::sqrt(x)
#define KV_H2F(x) float(x)
#define KV_NEG_INF (-INFINITY)
#define KV_SHFL_XOR(x, o) simd_shuffle_xor(x, ushort(o))
#define KV_WARP_ANY(p) simd_any(p)
// (FOLD, the last-block combine, is dispatched on CUDA only: a threadgroup barrier does
// not order device memory between threadgroups; these keep the text parsing.)
#define KV_DEVICE_FENCE() threadgroup_barrier(mem_flags::mem_device)
#define KV_ATOMIC_INC(p, i)   atomic_fetch_add_explicit((device atomic_uint*)((p) + (i)), 1u, memory_order_relaxed)
