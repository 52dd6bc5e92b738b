// ---------------------------------------------------------------- tensor-core decode
// Matrix-unit helpers for the mma decode bodies, appended to the backend header of that kernel
// only. One warp computes C (16x8, fp32) += A (16x16, fp16) B (16x8, fp16). Fragments are
// uint32 words holding two fp16 (low half = lower k). A lane owns, with G = KV_MG(lane) in
// 0..7 and L = KV_ML(lane) in 0..3 (a bijection of the 32 lanes):
//   a[0]: A[G][2L, 2L+1]   a[1]: A[G+8][2L, 2L+1]   a[2]: A[G][2L+8, 2L+9]   a[3]: A[G+8][..]
//   c[0], c[1]: C[G][2L], C[G][2L+1]                c[2], c[3]: C[G+8][2L], C[G+8][2L+1]
// B is opaque: kv_load_b fills it from shared memory (B[k][n] = p[k*ldk + n*ldn]).
// KV_GX0..2: the lane xor-masks that change G and keep L (a reduction over G).
// CUDA: mma.sync m16n8k16 (its documented fragment layout). Metal: four 8x8
// simdgroup_matrix products per call (A[G][2L..] is where thread_elements() keeps a lane's
// two elements of an 8x8 block).
#define KV_MG(lane) ((lane) >> 2)
#define KV_ML(lane) ((lane) & 3)
#define KV_GX0 4
#define KV_GX1 8
#define KV_GX2 16
#define KV_WARP_SYNC() __syncwarp()
// Pair tables: KV_TAB_PAD(p, n) words from p to the next shared-window address that is a
// multiple of n words (a power of two); a lookup is one ld.shared at a 32-bit address,
// base | offset where the base is aligned (a), else base + offset.
#define KV_TAB_PAD(p, n) ((0u - uint32_t(__cvta_generic_to_shared(p)) / 4u) & uint32_t((n) - 1))
#define KV_TAB_BASE uint32_t
#define KV_TAB_ADDR(p) uint32_t(__cvta_generic_to_shared(p))
__device__ __forceinline__ uint32_t kv_tab_load(bool a, uint32_t base, uint32_t off) {
  uint32_t r;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(r) : "r"(a ? (base | off) : (base + off)));
  return r;
}
#define KV_TAB_LOAD(a, base, off) kv_tab_load(a, base, off)
// Four copies of v at p (16-byte aligned): one 128-bit shared store.
__device__ __forceinline__ void kv_store4(uint32_t* p, uint32_t v) {
  *reinterpret_cast<uint4*>(p) = make_uint4(v, v, v, v);
}
__device__ __forceinline__ uint32_t kv_pack_h2(float lo, float hi) {
  return uint32_t(__half_as_ushort(__float2half_rn(lo)))
         | (uint32_t(__half_as_ushort(__float2half_rn(hi))) << 16);
}
__device__ __forceinline__ void kv_load_b(uint32_t* b, const float* p, int ldk, int ldn,
                                          int lane) {
  const int g = lane >> 2, l = lane & 3;
  b[0] = kv_pack_h2(p[(2 * l) * ldk + g * ldn], p[(2 * l + 1) * ldk + g * ldn]);
  b[1] = kv_pack_h2(p[(2 * l + 8) * ldk + g * ldn], p[(2 * l + 9) * ldk + g * ldn]);
}
__device__ __forceinline__ void kv_mma(float* c, const uint32_t* a, const uint32_t* b) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
