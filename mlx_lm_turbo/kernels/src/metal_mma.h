#define KV_MG(lane) ((((lane) >> 2) & 4) + (((lane) >> 1) & 3))
#define KV_ML(lane) ((((lane) >> 2) & 2) + ((lane) & 1))
#define KV_GX0 2
#define KV_GX1 4
#define KV_GX2 16
#define KV_WARP_SYNC() simdgroup_barrier(mem_flags::mem_threadgroup)
#define KV_TAB_PAD(p, n) 0
#define KV_TAB_BASE const threadgroup char*
#define KV_TAB_ADDR(p) ((const threadgroup char*)(p))
#define KV_TAB_LOAD(a, base, off) (*(const threadgroup uint32_t*)((base) + (off)))
inline void kv_store4(threadgroup uint32_t* p, uint32_t v) {
  *((threadgroup uint4*)p) = uint4(v, v, v, v);
}
inline uint32_t kv_pack_h2(float lo, float hi) {
  return as_type<uint32_t>(half2(half(lo), half(hi)));
}
inline void kv_load_b(thread uint32_t* b, const threadgroup float* p, int ldk, int ldn,
                      int lane) {
  const int fm = KV_MG(lane), fn = 2 * KV_ML(lane);
  b[0] = kv_pack_h2(p[fm * ldk + fn * ldn], p[fm * ldk + (fn + 1) * ldn]);
  b[1] = kv_pack_h2(p[(fm + 8) * ldk + fn * ldn], p[(fm + 8) * ldk + (fn + 1) * ldn]);
}
inline simdgroup_matrix<half, 8, 8> kv_frag8(uint32_t x) {
  simdgroup_matrix<half, 8, 8> m;
  const half2 h = as_type<half2>(x);
  m.thread_elements()[0] = h.x;
  m.thread_elements()[1] = h.y;
  return m;
}
inline void kv_mma(thread float* c, thread const uint32_t* a, thread const uint32_t* b) {
  simdgroup_matrix<float, 8, 8> c0, c1;
  c0.thread_elements()[0] = c[0];
  c0.thread_elements()[1] = c[1];
  c1.thread_elements()[0] = c[2];
  c1.thread_elements()[1] = c[3];
  const simdgroup_matrix<half, 8, 8> b0 = kv_frag8(b[0]);
  const simdgroup_matrix<half, 8, 8> b1 = kv_frag8(b[1]);
  simdgroup_multiply_accumulate(c0, kv_frag8(a[0]), b0, c0);
  simdgroup_multiply_accumulate(c0, kv_frag8(a[2]), b1, c0);
  simdgroup_multiply_accumulate(c1, kv_frag8(a[1]), b0, c1);
  simdgroup_multiply_accumulate(c1, kv_frag8(a[3]), b1, c1);
  c[0] = c0.thread_elements()[0];
  c[1] = c0.thread_elements()[1];
  c[2] = c1.thread_elements()[0];
  c[3] = c1.thread_elements()[1];
}
