"""Kernel sources: each body written once, plus a small header per backend.

The bodies use only the macros and names below, so the same text compiles as Metal
(``mx.fast.metal_kernel``) and CUDA (``mx.fast.cuda_kernel``):

    KV_SHARED        declares block-shared memory (threadgroup / __shared__)
    KV_TG, KV_DEV    address spaces for pointer casts (threadgroup / device; empty in CUDA)
    KV_BARRIER()     block-wide barrier
    KV_WARP_MAX/SUM  reductions over the 32 lanes of a SIMD group / warp
    KV_SHFL_XOR(x, o)  lane l reads x of lane l ^ o (all 32 lanes take part)
    KV_WARP_ANY(p)   whether p holds on any lane of the warp (all 32 lanes take part)
    KV_EXP, KV_MAX, KV_MIN, KV_SQRT, KV_H2F, KV_NEG_INF, KV_IMAX (int max)
    kv_tid, kv_lane, kv_warp, kv_bx, kv_by, kv_nbx   thread / group indices (set by the prelude)

MLX builds the kernel signature from the input names, and on Metal it adds a thread
attribute only when the *source* mentions it, so the index variables are defined by a
per-backend prelude prepended to the body rather than by header macros.

Layout facts the bodies rely on (see ``packing.py``): code i of a vector sits in bits
[i*b, (i+1)*b) of its little-endian word stream; codes/norms of token j of head h are at
``h*stride[1] + j*W`` (the cache hands over slices along the token axis, so only the
two outer strides vary).
"""

METAL_HEADER = """
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
#define KV_ATOMIC_INC(p, i) \
  atomic_fetch_add_explicit((device atomic_uint*)((p) + (i)), 1u, memory_order_relaxed)
"""

METAL_PRELUDE = """
  const int kv_tid = int(thread_position_in_threadgroup.x);
  const int kv_bx = int(threadgroup_position_in_grid.x);
  const int kv_by = int(threadgroup_position_in_grid.y);
  const int kv_nbx = int(threadgroups_per_grid.x);
  const int kv_nby = int(threadgroups_per_grid.y);
  const int kv_lane = int(thread_index_in_simdgroup);
  const int kv_warp = int(simdgroup_index_in_threadgroup);
"""

CUDA_HEADER = """
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
"""

CUDA_PRELUDE = """
  const int kv_tid = int(threadIdx.x);
  const int kv_bx = int(blockIdx.x);
  const int kv_by = int(blockIdx.y);
  const int kv_nbx = int(gridDim.x);
  const int kv_nby = int(gridDim.y);
  const int kv_lane = int(threadIdx.x) & 31;
  const int kv_warp = int(threadIdx.x) >> 5;
"""

def rows_hadamard(buf: str, n: str, rows: str = "RB") -> str:
    """Kernel text: unnormalised in-place Walsh-Hadamard transform (MLX's order) of the
    first ``rows`` (of RB) rows of length ``n`` in shared array ``buf`` (written before a
    barrier), ending on a barrier. Rows of 32 or more: one warp per row, n/32 consecutive
    entries per lane, butterflies of smaller stride in registers and the others by
    shuffles (the mma kernel spent ~8% of its instructions at 128k in the
    barrier-per-stage form, ~1170 per warp; now ~130). Shorter rows: the butterflies
    spread over the block, a barrier per stage."""
    return f"""    if ({n} >= 32) {{
      constexpr int E_ = {n} >= 32 ? {n} / 32 : 1;
      for (int r = kv_warp; r < {rows}; r += NT / 32) {{
        KV_TG float* row_ = {buf} + r * {n} + kv_lane * E_;
        float x_[E_];
#pragma unroll
        for (int e = 0; e < E_; ++e) x_[e] = row_[e];
#pragma unroll
        for (int hh = 1; hh < E_; hh <<= 1)
#pragma unroll
          for (int e = 0; e < E_; ++e)
            if (!(e & hh)) {{
              const float a = x_[e];
              const float c = x_[e + hh < E_ ? e + hh : e];
              x_[e] = a + c;
              x_[e + hh < E_ ? e + hh : e] = a - c;
            }}
        // Stride hh * E_: the partner is lane ^ hh; the upper entry takes y - x.
#pragma unroll
        for (int hh = 1; hh < 32; hh <<= 1) {{
          const float sg = (kv_lane & hh) ? -1.0f : 1.0f;
#pragma unroll
          for (int e = 0; e < E_; ++e) x_[e] = x_[e] * sg + KV_SHFL_XOR(x_[e], hh);
        }}
#pragma unroll
        for (int e = 0; e < E_; ++e) row_[e] = x_[e];
      }}
    }} else {{
      for (int hh = 1; hh < {n}; hh <<= 1) {{
        for (int e = kv_tid; e < ({rows}) * {n} / 2; e += NT) {{
          const int r = e / ({n} / 2);
          const int k = e - r * ({n} / 2);
          const int i = r * {n} + (k / hh) * 2 * hh + (k % hh);
          const float x0 = {buf}[i];
          const float x1 = {buf}[i + hh];
          {buf}[i] = x0 + x1;
          {buf}[i + hh] = x0 - x1;
        }}
        KV_BARRIER();
      }}
    }}
    KV_BARRIER();
"""


# Online-softmax step of a tile, shared by the coded and the window loops (s[RB]: this
# thread's key scores, -inf where masked; vnorm: its value scale). TILE_MAX ends on the
# barrier after which the previous tile's value stage may be overwritten.
TILE_MAX = """
    for (int r = 0; r < RB; ++r) {
      const float mw = KV_WARP_MAX(s[r]);
      if (kv_lane == 0) red_s[kv_warp * RB + r] = mw;
    }
    KV_BARRIER();"""

TILE_RESCALE = """
    float alpha[RB];
    for (int r = 0; r < RB; ++r) {
      float mn = m_run[r];
      for (int w = 0; w < NW; ++w) mn = KV_MAX(mn, red_s[w * RB + r]);
      alpha[r] = (m_run[r] == KV_NEG_INF) ? 0.0f : KV_EXP(m_run[r] - mn);
      m_run[r] = mn;
      const float p = (s[r] == KV_NEG_INF) ? 0.0f : KV_EXP(s[r] - mn);
      l_run[r] = l_run[r] * alpha[r] + p;
      ws_s[kv_tid * RB + r] = p * vnorm;
    }
    for (int k = 0; k < DPL; ++k)
      for (int r = 0; r < RB; ++r) acc[k * RB + r] *= alpha[r];
    KV_BARRIER();"""

# Key t of the tile's softmax weights for this block's rows -> wr[RB].
TILE_WEIGHTS = """
      float wr[RB];
      if (RB % 4 == 0) {
        for (int r4 = 0; r4 < RB / 4; ++r4) {
          const float4 wv = ws4[(t * RB) / 4 + r4];
          wr[4 * r4] = wv.x; wr[4 * r4 + 1] = wv.y; wr[4 * r4 + 2] = wv.z; wr[4 * r4 + 3] = wv.w;
        }
      } else {
        for (int r = 0; r < RB; ++r) wr[r] = ws_s[t * RB + r];
      }"""

# The window block's tiles (WIN > 0): one thread per copy, scores against the raw queries
# in qs (minus the key mean staged in tab), values read straight from the copies. Not
# unrolled: registers are allocated for the kernel's worst path, the coded blocks' too.
WINDOW_LOOP = """
  // ---- the window block: copies of positions [w0, S) ----
  if (wblk) {
    for (int tile = start; tile < end; tile += NT) {
      const int j = tile + kv_tid;
      const float vnorm = 1.0f;
      float s[RB];
      for (int r = 0; r < RB; ++r) s[r] = KV_NEG_INF;
      if (j < end) {
        float a[RB];
        for (int r = 0; r < RB; ++r) a[r] = 0.0f;
        const long kb = rkb + long(j - w0) * rk_strides[2];
#pragma unroll 1
        for (int i = 0; i < D; ++i) {
          float kx = static_cast<float>(rk[kb + long(i) * rk_strides[3]]);
          if (WCTR == 1) kx -= tab[i];
          for (int r = 0; r < RB; ++r) a[r] += qs[r * D + i] * kx;
        }
        // Copies from this row's cut on (causal: up to the row's own position).
        for (int r = 0; r < RB; ++r) {
          const int qi = S - QL + (rg * RB + r) % QL;
          if (j >= KV_IMAX(w0, qi - WIN + 1) && (MASK != 1 || j <= qi)) s[r] = a[r];
        }
      }
""" + TILE_MAX + TILE_RESCALE + """
      const int nk = KV_MIN(NT, end - tile);
      for (int t = kv_warp; t < nk; t += NW) {
""" + TILE_WEIGHTS + """
        const long vb = rvb + long(tile + t - w0) * rv_strides[2];
#pragma unroll 1
        for (int k = 0; k < DPL; ++k) {
          const float c = static_cast<float>(rv[vb + long(kv_lane * DPL + k) * rv_strides[3]]);
          for (int r = 0; r < RB; ++r) acc[k * RB + r] += wr[r] * c;
        }
      }
    }
  }
"""

# Split-K decode attention over packed codes. One block = one (batch, KV head, row group,
# split of the sequence). Rows are the G*L query rows (G query heads of this KV head x L
# positions) of the row group, so the codes of a KV head are read once for all its query
# heads. Template constants (set by the dispatcher):
#   D, DV       key / value head dims (DV multiple of 32)
#   KB1, WK1    bits / words of key stream 1; KB2, WK2 of stream 2 (0 when absent)
#   KMODE       0 mse, 1 rvq (two codebooks summed), 2 prod (stream 2 = QJL signs)
#   VB, WV, VMODE   value bits / words; 0 mse, 1 rvq
#   GQ, QL      query heads per KV head, query length L; RB rows per block, NRG row groups
#   MASK        0 none, 1 causal, 2 additive array
#   ROTQ        1: q is raw, the block applies Π_K (random signs + Hadamard) itself;
#               0: q arrives rotated and scaled (dense rotations, prod keys)
#   NT          threads per block (= keys per tile); TABN table floats; SH shared floats
#   QT          the queries' dtype (only to key MLX's kernel cache)
#   WIN         fp16 window W (0: none, and qw/rk/rv/kmu are dummies). With a window the
#               last split (kv_bx == kv_nbx - 1) is the *window block*: it reads the
#               uncompressed copies rk/rv of positions [S-n, S) (n = rk_shape[2]) instead
#               of codes, and the coded splits cover [0, Sc) only. Row (query l, position
#               i = S-QL+l) reads codes for j < c = max(S-n, i-W+1) and copies for
#               c <= j (and j <= i when causal): attention._with_window's rule, c <= i.
#   WCTR        1: subtract the key mean kmu from the copies (the codes are centred)
#   WROTV       1: the window block sums raw values and applies Π_V to its partial
#               (H(vmul ⊙ o)), so it joins the coded splits' domain; 0: rv arrives rotated
#   QWT, RKT, RVT, MUT  dtypes of qw, rk, rv, kmu (only to key MLX's kernel cache)
#
# The window block scores with the raw queries qw (x scale = qmul[D]) against k - μ: with
# an orthogonal Π_K that equals the rotated-domain score, so the copies are never rotated.
#
# Score of key j for row r: s = rho_j * (sum_i T1[i][code1_i][r] + rn_j * sum_i T2[i][code2_i][r])
# where the tables T[i][c][r] = q~_r[i] * codebook[c] are built once per block: one shared
# load and one add per code and row, no multiply and no separate codebook lookup.
DECODE_BODY = """
  constexpr int NW = NT / 32;
  constexpr int NC1 = 1 << KB1;
  constexpr int NC2 = (KB2 > 0) ? (1 << KB2) : 1;
  constexpr int T2OFF = D * NC1 * RB;
  constexpr int DPL = DV / 32;
  constexpr int NCV = 1 << VB;
  constexpr uint32_t KM1 = (1u << KB1) - 1u;
  constexpr uint32_t KM2 = (KB2 > 0) ? ((1u << KB2) - 1u) : 0u;
  constexpr uint32_t VM = (1u << VB) - 1u;
  constexpr int RPAD = NRG * RB;
  constexpr int NV = VMODE == 1 ? 2 : 1;

  // sm: [score tables (TABN) | q rows, later the tile's value codes]; at the end the
  // per-warp partial sums reuse it from the start. The window block keeps the key mean
  // in tab[0, D) (no tables) and its raw q rows in the same place as the others'.
  KV_SHARED float4 sm4[SH / 4];
  KV_SHARED float cbv_s[2 * NCV];
  KV_SHARED float red_s[NW * RB];
  KV_SHARED float4 ws4[(NT * RB + 3) / 4];
  KV_TG float* tab = (KV_TG float*)sm4;
  KV_TG float* qs = tab + TABN;
  KV_TG uint32_t* vst = (KV_TG uint32_t*)(tab + TABN);
  KV_TG float* ws_s = (KV_TG float*)ws4;

  const int split = kv_bx;
  const int nsp = kv_nbx;
  const int S = int(kn_shape[2]);
  // Window (WIN > 0): the last block reads the copies of [w0, S); codes are read below Sc.
  const bool wblk = (WIN > 0) && (split == nsp - 1);
  const int w0 = S - ((WIN > 0) ? int(rk_shape[2]) : 0);
  const int Sc = (WIN > 0) ? KV_IMAX(w0, S - WIN) : S;
  const int ncs = (WIN > 0) ? nsp - 1 : nsp;   // coded splits (the dispatcher keeps >= 1)
  const int bh = kv_by / NRG;
  const int rg = kv_by - bh * NRG;
  const int H = int(kn_shape[1]);
  const int b = bh / H;
  const int h = bh - b * H;

  // Which tokens this split owns: chunks are whole tiles.
  int chunk = (Sc + ncs - 1) / ncs;
  chunk = ((chunk + NT - 1) / NT) * NT;
  const int start = wblk ? w0 : split * chunk;
  const int end = wblk ? S : KV_MIN(Sc, start + chunk);

  // ---- query rows -> shared (row rr = g*QL + l; rows past GQ*QL are zero) ----
  for (int e = kv_tid; e < RB * D; e += NT) {
    const int r = e / D;
    const int i = e - r * D;
    const int rr = rg * RB + r;
    float v = 0.0f;
    if (rr < GQ * QL) {
      const int g = rr / QL;
      const int l = rr - g * QL;
      if (wblk) {   // raw query x scale: the window block never rotates
        v = static_cast<float>(qw[long(b) * qw_strides[0] + long(h * GQ + g) * qw_strides[1]
                                  + long(l) * qw_strides[2] + long(i) * qw_strides[3]]) * qmul[D];
      } else {
        v = static_cast<float>(q[long(b) * q_strides[0] + long(h * GQ + g) * q_strides[1]
                                 + long(l) * q_strides[2] + i]) * qmul[i];
      }
    }
    qs[e] = v;
  }
  KV_BARRIER();
  if (ROTQ == 1 && !wblk) {
    // Unnormalised fast Walsh-Hadamard transform of each row (qmul holds signs*scale/sqrt(D)).
""" + rows_hadamard("qs", "D") + """  }

  // ---- score tables and value codebooks (the window block: the key mean in tab[0, D)) ----
  if (wblk) {
    if (WCTR == 1) {
      const long mub = long(int(kmu_shape[0]) == 1 ? 0 : b) * kmu_strides[0]
                       + long(h) * kmu_strides[1];
      for (int e = kv_tid; e < D; e += NT)
        tab[e] = static_cast<float>(kmu[mub + long(e) * kmu_strides[3]]);
    }
  } else {
    for (int e = kv_tid; e < D * NC1 * RB; e += NT) {
      const int r = e % RB;
      const int c = (e / RB) % NC1;
      const int i = e / (RB * NC1);
      tab[e] = qs[r * D + i] * cbk1[c];
    }
    if (KB2 > 0) {
      for (int e = kv_tid; e < D * NC2 * RB; e += NT) {
        const int r = e % RB;
        const int c = (e / RB) % NC2;
        const int i = e / (RB * NC2);
        float qv = qs[r * D + i];
        if (KMODE == 2) {
          const int rr = rg * RB + r;
          qv = 0.0f;
          if (rr < GQ * QL) {
            const int g = rr / QL;
            const int l = rr - g * QL;
            qv = q2[long(b) * q2_strides[0] + long(h * GQ + g) * q2_strides[1]
                    + long(l) * q2_strides[2] + i];
          }
        }
        tab[T2OFF + e] = qv * cbk2[c];
      }
    }
    for (int e = kv_tid; e < 2 * NCV; e += NT) {
      cbv_s[e] = (e < NCV) ? cbv1[e] : ((VMODE == 1) ? cbv2[e - NCV] : 0.0f);
    }
  }

  const long kbase1 = long(b) * kc1_strides[0] + long(h) * kc1_strides[1];
  const long kbase2 = long(b) * kc2_strides[0] + long(h) * kc2_strides[1];
  const long knb = long(b) * kn_strides[0] + long(h) * kn_strides[1];
  const long krb = long(b) * krn_strides[0] + long(h) * krn_strides[1];
  const long vbase1 = long(b) * vc1_strides[0] + long(h) * vc1_strides[1];
  const long vbase2 = long(b) * vc2_strides[0] + long(h) * vc2_strides[1];
  const long vnb = long(b) * vn_strides[0] + long(h) * vn_strides[1];
  const long mrow = long(bh * RPAD + rg * RB) * long(S);
  const long rkb = long(b) * rk_strides[0] + long(h) * rk_strides[1];
  const long rvb = long(b) * rv_strides[0] + long(h) * rv_strides[1];

  // This lane's value dims are [kv_lane*DPL, (kv_lane+1)*DPL): one window of DPL*VB <= 32
  // bits starting at vbit0, read from at most two words.
  const int vbit0 = kv_lane * DPL * VB;
  const int vw0 = vbit0 >> 5;
  const int voff = vbit0 & 31;
  const int vw1 = KV_MIN(vw0 + 1, WV - 1);

  float m_run[RB];
  float l_run[RB];
  float acc[DPL * RB];
  for (int r = 0; r < RB; ++r) { m_run[r] = KV_NEG_INF; l_run[r] = 0.0f; }
  for (int k = 0; k < DPL * RB; ++k) acc[k] = 0.0f;

  KV_BARRIER();
""" + WINDOW_LOOP + """
  // ---- coded splits (none in the window block) ----
  for (int tile = wblk ? end : start; tile < end; tile += NT) {
    // The tile's value codes are one contiguous run: issue those loads (coalesced) first,
    // so they are in flight during the scores; they reach shared memory after barrier 1.
    const int vcnt = KV_MIN(NT, end - tile) * WV;
    uint32_t vreg[WV];
    uint32_t vreg2[NV == 2 ? WV : 1];
#pragma unroll
    for (int k = 0; k < WV; ++k) {
      const int e = kv_tid + k * NT;
      vreg[k] = e < vcnt ? vc1[vbase1 + long(tile) * WV + e] : 0u;
      if (NV == 2) vreg2[k] = e < vcnt ? vc2[vbase2 + long(tile) * WV + e] : 0u;
    }

    // ---- scores: one thread per key ----
    const int j = tile + kv_tid;
    const bool valid = j < end;
    float s[RB];
    float s2[RB];
    for (int r = 0; r < RB; ++r) { s[r] = 0.0f; s2[r] = 0.0f; }
    float vnorm = 0.0f;
    if (valid) {
      uint32_t kw[WK1];
      const KV_DEV uint32_t* kp = kc1 + kbase1 + long(j) * WK1;
      if (WK1 % 4 == 0) {
#pragma unroll
        for (int w = 0; w < WK1 / 4; ++w) {
          const uint4 v = ((const KV_DEV uint4*)kp)[w];
          kw[4 * w] = v.x; kw[4 * w + 1] = v.y; kw[4 * w + 2] = v.z; kw[4 * w + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int w = 0; w < WK1; ++w) kw[w] = kp[w];
      }
      const float rho = KV_H2F(kn[knb + j]);
      const float rn = (KMODE == 2) ? KV_H2F(krn[krb + j]) : 1.0f;
      vnorm = KV_H2F(vn[vnb + j]);
#pragma unroll
      for (int i = 0; i < D; ++i) {
        const int bit = i * KB1;
        const int wi = bit >> 5;
        const int off = bit & 31;
        uint32_t code = kw[wi] >> off;
        if (off + KB1 > 32) code |= kw[wi + 1] << (32 - off);
        code &= KM1;
        const int t = (i * NC1 + int(code)) * RB;
        if (RB % 4 == 0) {
#pragma unroll
          for (int r4 = 0; r4 < RB / 4; ++r4) {
            const float4 tv = sm4[t / 4 + r4];
            s[4 * r4] += tv.x; s[4 * r4 + 1] += tv.y; s[4 * r4 + 2] += tv.z; s[4 * r4 + 3] += tv.w;
          }
        } else {
#pragma unroll
          for (int r = 0; r < RB; ++r) s[r] += tab[t + r];
        }
      }
      if (KB2 > 0) {
        uint32_t kw2[WK2 > 0 ? WK2 : 1];
        const KV_DEV uint32_t* kp2 = kc2 + kbase2 + long(j) * WK2;
        if (WK2 % 4 == 0) {
#pragma unroll
          for (int w = 0; w < WK2 / 4; ++w) {
            const uint4 v = ((const KV_DEV uint4*)kp2)[w];
            kw2[4 * w] = v.x; kw2[4 * w + 1] = v.y; kw2[4 * w + 2] = v.z; kw2[4 * w + 3] = v.w;
          }
        } else {
#pragma unroll
          for (int w = 0; w < WK2; ++w) kw2[w] = kp2[w];
        }
#pragma unroll
        for (int i = 0; i < D; ++i) {
          const int bit = i * KB2;
          const int wi = bit >> 5;
          const int off = bit & 31;
          uint32_t code = kw2[wi] >> off;
          if (off + KB2 > 32) code |= kw2[wi + 1] << (32 - off);
          code &= KM2;
          const int t = T2OFF + (i * NC2 + int(code)) * RB;
          if (RB % 4 == 0) {
#pragma unroll
            for (int r4 = 0; r4 < RB / 4; ++r4) {
              const float4 tv = sm4[t / 4 + r4];
              s2[4 * r4] += tv.x; s2[4 * r4 + 1] += tv.y;
              s2[4 * r4 + 2] += tv.z; s2[4 * r4 + 3] += tv.w;
            }
          } else {
#pragma unroll
            for (int r = 0; r < RB; ++r) s2[r] += tab[t + r];
          }
        }
      }
      for (int r = 0; r < RB; ++r) s[r] = rho * (s[r] + rn * s2[r]);
      if (WIN > 0) {
        // Codes only below this row's cut (the window block reads the copies from there).
        for (int r = 0; r < RB; ++r) {
          const int qi = S - QL + (rg * RB + r) % QL;
          if (j >= KV_IMAX(w0, qi - WIN + 1)) s[r] = KV_NEG_INF;
        }
      } else if (MASK == 1) {
        for (int r = 0; r < RB; ++r) {
          const int l = (rg * RB + r) % QL;
          if (j > S - QL + l) s[r] = KV_NEG_INF;
        }
      } else if (MASK == 2) {
        for (int r = 0; r < RB; ++r) s[r] += mask[mrow + long(r) * S + j];
      }
    } else {
      for (int r = 0; r < RB; ++r) s[r] = KV_NEG_INF;
    }

    // ---- online softmax: the tile max is block-uniform ----
""" + TILE_MAX + """
    // Every warp is past the previous tile's value phase: the stage can be overwritten.
#pragma unroll
    for (int k = 0; k < WV; ++k) {
      vst[kv_tid + k * NT] = vreg[k];
      if (NV == 2) vst[NT * WV + kv_tid + k * NT] = vreg2[k];
    }
""" + TILE_RESCALE + """

    // ---- values: warp w takes keys w, w+NW, ...; lane owns DPL consecutive dims ----
    const int nk = KV_MIN(NT, end - tile);
    for (int t = kv_warp; t < nk; t += NW) {
""" + TILE_WEIGHTS + """
      uint32_t x = vst[t * WV + vw0] >> voff;
      if (voff + DPL * VB > 32) x |= vst[t * WV + vw1] << (32 - voff);
      uint32_t x2 = 0u;
      if (NV == 2) {
        x2 = vst[NT * WV + t * WV + vw0] >> voff;
        if (voff + DPL * VB > 32) x2 |= vst[NT * WV + t * WV + vw1] << (32 - voff);
      }
#pragma unroll
      for (int k = 0; k < DPL; ++k) {
        float c = cbv_s[(x >> (k * VB)) & VM];
        if (NV == 2) c += cbv_s[NCV + ((x2 >> (k * VB)) & VM)];
#pragma unroll
        for (int r = 0; r < RB; ++r) acc[k * RB + r] += wr[r] * c;
      }
    }
  }

  // ---- block partials: sum l over threads and acc over warps (reusing shared memory) ----
  KV_BARRIER();
  for (int r = 0; r < RB; ++r) {
    const float lw = KV_WARP_SUM(l_run[r]);
    if (kv_lane == 0) red_s[kv_warp * RB + r] = lw;
  }
  for (int k = 0; k < DPL; ++k)
    for (int r = 0; r < RB; ++r)
      tab[(kv_warp * DV + kv_lane * DPL + k) * RB + r] = acc[k * RB + r];
  KV_BARRIER();
  const long pidx = long(kv_by) * nsp + split;
  if (WIN > 0 && WROTV == 1 && wblk) {
    // The copies were summed in the original domain: o <- Π_V o = H(vmul ⊙ o) per row,
    // in shared memory, so the combine kernel treats this split like the coded ones.
    constexpr int NO = (RB * DV + NT - 1) / NT;
    float ov[NO];
#pragma unroll
    for (int k = 0; k < NO; ++k) {
      const int e = kv_tid + k * NT;
      const int r = e / DV;
      const int d = e - r * DV;
      float o = 0.0f;
      if (e < RB * DV)
        for (int w = 0; w < NW; ++w) o += tab[(w * DV + d) * RB + r];
      ov[k] = o * vmul[d];
    }
    KV_BARRIER();
#pragma unroll
    for (int k = 0; k < NO; ++k)
      if (kv_tid + k * NT < RB * DV) tab[kv_tid + k * NT] = ov[k];
    KV_BARRIER();
""" + rows_hadamard("tab", "DV") + """    for (int e = kv_tid; e < RB * DV; e += NT) opart[pidx * RB * DV + e] = tab[e];
  } else {
    for (int e = kv_tid; e < RB * DV; e += NT) {
      const int r = e / DV;
      const int d = e - r * DV;
      float o = 0.0f;
      for (int w = 0; w < NW; ++w) o += tab[(w * DV + d) * RB + r];
      opart[pidx * RB * DV + e] = o;
    }
  }
  if (kv_tid < RB) {
    float lt = 0.0f;
    for (int w = 0; w < NW; ++w) lt += red_s[w * RB + kv_tid];
    mpart[pidx * RB + kv_tid] = m_run[kv_tid];
    lpart[pidx * RB + kv_tid] = lt;
  }
"""

# Combines the splits of one output row: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s,
# then (ROTV) Π_Vᵀ = Hadamard + random signs, written straight into the (B, Hq, L, DV)
# output in the queries' dtype OT. One block of DV*SG threads per row (padding rows of the
# last row group return at once): thread (g, d) runs an online softmax over the splits
# s = g, g+SG, ..., U splits at a time with their loads issued together, then group 0
# merges the SG groups and applies the Hadamard transform: its stages within a warp by
# shuffles, the last log2(DV/32) as one DV/32-point transform through shared memory.
# The kernel is a chain of L2 round trips, not bandwidth: a loop over every split per
# thread took ~24 µs for 64 splits on the H100, one round trip per split; the previous
# version (one round trip per phase, seven barrier stages of Hadamard) 6.4-8.2 µs.
# Partials are [B, Hkv, NRG, split, RB, DV].
REDUCE_BODY = """
  constexpr int NTR = DV * SG;
  constexpr int U = 8;
  KV_SHARED float osg[NTR];
  KV_SHARED float msg[SG];
  KV_SHARED float lsg[SG];
  const int Hkv = int(opart_shape[1]);
  const int nrg = int(opart_shape[2]);
  const int nsp = int(opart_shape[3]);
  const int row = kv_bx;                 // (b, h, rg, r)
  const int r = row % RB;
  const int rb = row / RB;               // (b, h, rg)
  const int rg = rb % nrg;
  const int bh = rb / nrg;
  const int rr = rg * RB + r;
  if (rr >= GQ * QL) return;             // a padding row (the whole block): no output
  const int d = kv_tid % DV;
  const int g = kv_tid / DV;
  const long sbase = long(rb) * nsp;
  float M = KV_NEG_INF;
  float den = 0.0f;
  float num = 0.0f;
  for (int s0 = g; s0 < nsp; s0 += U * SG) {
    float m[U], l[U], o[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = s0 + u * SG;
      const long i = (sbase + (s < nsp ? s : 0)) * RB + r;
      m[u] = s < nsp ? mpart[i] : KV_NEG_INF;
      l[u] = s < nsp ? lpart[i] : 0.0f;
      o[u] = s < nsp ? opart[i * DV + d] : 0.0f;
    }
    float mc = M;
#pragma unroll
    for (int u = 0; u < U; ++u) mc = KV_MAX(mc, m[u]);
    if (mc != KV_NEG_INF) {              // (all splits so far fully masked: nothing yet)
      const float a = (M == KV_NEG_INF) ? 0.0f : KV_EXP(M - mc);
      den *= a;
      num *= a;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float w = (m[u] == KV_NEG_INF) ? 0.0f : KV_EXP(m[u] - mc);
        den += w * l[u];
        num += w * o[u];
      }
      M = mc;
    }
  }
  osg[kv_tid] = num;
  if (d == 0) {
    msg[g] = M;
    lsg[g] = den;
  }
  KV_BARRIER();
  float x = 0.0f;
  if (g == 0) {
    float Mx = msg[0];
    for (int k = 1; k < SG; ++k) Mx = KV_MAX(Mx, msg[k]);
    float dn = 0.0f;
    float o = 0.0f;
    for (int k = 0; k < SG; ++k) {
      if (msg[k] != KV_NEG_INF) {
        const float w = KV_EXP(msg[k] - Mx);
        dn += w * lsg[k];
        o += w * osg[k * DV + d];
      }
    }
    x = dn > 0.0f ? o / dn : 0.0f;
    if (ROTV == 1) {
      // Butterflies (i, i + hh) of the lanes of a warp (g == 0 is whole warps: DV % 32 == 0).
      for (int hh = 1; hh < 32 && hh < DV; hh <<= 1) {
        const float y = KV_SHFL_XOR(x, hh);
        x = (kv_lane & hh) ? y - x : x + y;
      }
    }
  }
  if (ROTV == 1 && DV > 32) {
    // H_DV = H_(DV/32) (x) H_32: the warps' 32-point transforms, then the DV/32-point one
    // across warps, entry (w, w2) = (-1)^popcount(w & w2).
    KV_BARRIER();                        // every thread is past reading osg
    if (g == 0) osg[d] = x;
    KV_BARRIER();
    if (g == 0) {
      const int w = d >> 5;
      float y = 0.0f;
      for (int w2 = 0; w2 < DV / 32; ++w2) {
        int t = w & w2;
        t ^= t >> 4;
        t ^= t >> 2;
        t ^= t >> 1;
        const float v = osg[(d & 31) + 32 * w2];
        y += (t & 1) ? -v : v;
      }
      x = y;
    }
  }
  if (g == 0) {
    const int b = bh / Hkv;
    const int h = bh - b * Hkv;
    const int gq = rr / QL;
    const int l = rr - gq * QL;
    const long o = (long(b * Hkv * GQ + h * GQ + gq) * QL + l) * DV + d;
    out[o] = static_cast<OT>(x * vmul[d]);
  }
"""

# Fused encode for the cache append: what MSECodec.encode / RVQCodec.encode compute, for
# vectors x (B, H, L, D) of any float dtype (read through x_strides: keys arrive as a
# transposed view), in one launch. One block of D threads per vector (thread i owns
# coordinate i), blocks loop over the vectors (grid-stride), so a prefill of many tokens
# needs no larger grid. Per vector:
#   ‖x‖ (fp32: warp sums, then the warps' partials in a fixed order);
#   y = H (s ⊙ x/‖x‖) / √D, an in-shared-memory Walsh-Hadamard transform in MLX's order;
#   MODE 0 (mse): idx = #{boundaries < y}, x̂_unit = c[idx];
#   MODE 1 (rvq): t = y / scale, idx1 on t, idx2 on t - c1[idx1], x̂_unit = (c1 + c2)·scale;
#   ρ = fp16(fp16(‖x‖) / ‖x̂_unit‖) (the codecs round ‖x‖ to fp16 before dividing);
#   thread w < W packs word w of each code stream (code i in bits [i*b, (i+1)*b)).
# The quantiser is the codebooks.quantize binary search, bit for bit (strict >).
# Template constants: D (power of two, 32..1024) threads and dims, BITS, W words per
# vector, MODE, NORMT the stored norm type, XT the input dtype (only to key MLX's cache),
# PAIR: 1 codes a second tensor x2 (same shape, own table cst2: the values of the same
# append) in the same launch, the second half of the blocks writing codes1b/codes2b/rhob
# (one launch per append instead of two: batch-1 decode waits on host time per launch);
# 0: x2, cst2 and the b outputs are one-element dummies.
# cst = [signs (D) | boundaries1, centroids1, boundaries2, centroids2 (2^BITS each, padded)
#        | 1/√D, scale]. codes2 is a one-word dummy in MODE 0.
# One vector's coding (ENCODE_BODY's steps from the norm on), shared by ENCODE_BODY and the
# appending decode launch (MMA_APPEND): thread i < D holds coordinate v (``load`` declares
# it); the text reads xs, cs1, cs2, red (shared), tab, sgn, hs, rs and the constants BITS,
# NL, W, MODE, NW = D / 32, writes word i < W of each code stream (``put_words``: w1, w2)
# and the norm (``put_norm``, thread 0: r16), and ends on a barrier.
CODE_VECTOR_QUANTISE = """
    const float ss = KV_WARP_SUM(v * v);
    if (kv_lane == 0) red[kv_warp] = ss;
    KV_BARRIER();
    float tot = 0.0f;
    for (int w = 0; w < NW; ++w) tot += red[w];
    const float nrm = KV_SQRT(tot);
    xs[i] = v / KV_MAX(nrm, 1e-30f) * sgn;
    KV_BARRIER();
    for (int hh = 1; hh < D; hh <<= 1) {
      if (i < D / 2) {
        const int j = (i / hh) * 2 * hh + (i % hh);
        const float x0 = xs[j];
        const float x1 = xs[j + hh];
        xs[j] = x0 + x1;
        xs[j + hh] = x0 - x1;
      }
      KV_BARRIER();
    }
    const float y = xs[i] * hs;

    // ---- quantise: binary search over the sorted boundaries (as codebooks.quantize) ----
    const float t = (MODE == 1) ? y / rs : y;
    uint32_t q1 = 0u;
    for (int s = BITS - 1; s >= 0; --s) {
      const uint32_t p = q1 + (1u << s);
      if (t > tab[p - 1]) q1 = p;
    }
    float rec = tab[NL + q1];
    if (MODE == 1) {
      const float r = t - rec;
      uint32_t q2 = 0u;
      for (int s = BITS - 1; s >= 0; --s) {
        const uint32_t p = q2 + (1u << s);
        if (r > tab[2 * NL + p - 1]) q2 = p;
      }
      rec = (rec + tab[3 * NL + q2]) * rs;
      cs2[i] = q2;
    }
    cs1[i] = q1;
    const float rr = KV_WARP_SUM(rec * rec);
    if (kv_lane == 0) red[NW + kv_warp] = rr;
    KV_BARRIER();

    // ---- pack: word w holds codes first..last, shifted into place ----
    if (i < W) {
      const int first = (32 * i) / BITS;
      const int last = KV_MIN(D - 1, (32 * i + 31) / BITS);
      uint32_t w1 = 0u;
      uint32_t w2 = 0u;
      for (int c = first; c <= last; ++c) {
        const int sh = c * BITS - 32 * i;
        w1 |= (sh >= 0) ? (cs1[c] << sh) : (cs1[c] >> (-sh));
        if (MODE == 1) w2 |= (sh >= 0) ? (cs2[c] << sh) : (cs2[c] >> (-sh));
      }
"""
CODE_VECTOR_NORM = """
    }
    if (i == 0) {
      float rt = 0.0f;
      for (int w = 0; w < NW; ++w) rt += red[NW + w];
      const float n16 = static_cast<float>(static_cast<NORMT>(nrm));
      const NORMT r16 = static_cast<NORMT>(n16 / KV_MAX(KV_SQRT(rt), 1e-30f));
"""
CODE_VECTOR_END = """
    }
    KV_BARRIER();  // the next vector reuses xs, cs1/cs2 and red
"""


def code_vector(load: str, put_words: str, put_norm: str) -> str:
    """Kernel text: one vector coded (see CODE_VECTOR_QUANTISE)."""
    return load + CODE_VECTOR_QUANTISE + put_words + CODE_VECTOR_NORM + put_norm + CODE_VECTOR_END


ENCODE_BODY = """
  constexpr int NW = D / 32;
  constexpr int NL = 1 << BITS;
  KV_SHARED float xs[D];
  KV_SHARED uint32_t cs1[D];
  KV_SHARED uint32_t cs2[D];
  KV_SHARED float red[2 * NW];
  KV_SHARED float tab[4 * NL];

  const int i = kv_tid;
  const int H = int(x_shape[1]);
  const int L = int(x_shape[2]);
  const int nvec = int(x_shape[0]) * H * L;
  // INPLACE: the codes go straight into the cache's buffers kb1/kb2/kbn (x) and
  // vb1/vb2/vbn (x2), row (b, h, pos[0] + l), not into fresh outputs. An MLX kernel has
  // no in-place output, and the slice writes that would copy outputs into the buffers
  // cost a graph node each, host time that batch-1 decode waits on. cache.py says when
  // the buffers are the cache's alone; the (unwritten) outputs only order later readers.
  // (The buffers' element strides: the codes' last one is 1.)
  // PAIR: blocks [0, nb) code x, blocks [nb, 2 nb) code x2 (the grid is even).
  const int nb = PAIR ? kv_nbx / 2 : kv_nbx;
  const bool second = PAIR && kv_bx >= nb;
  const int bx = second ? kv_bx - nb : kv_bx;
  for (int e = i; e < 4 * NL; e += D) tab[e] = second ? cst2[D + e] : cst[D + e];
  const float sgn = second ? cst2[i] : cst[i];
  const float hs = cst[D + 4 * NL];
  const float rs = second ? cst2[D + 4 * NL + 1] : cst[D + 4 * NL + 1];
  KV_BARRIER();

  for (int vec = bx; vec < nvec; vec += nb) {
    const int l = vec % L;
    const int bh = vec / L;
    const int h = bh % H;
    const int b = bh / H;
""" + code_vector("""
    const float v = second
        ? static_cast<float>(x2[long(b) * x2_strides[0] + long(h) * x2_strides[1]
                                + long(l) * x2_strides[2] + long(i) * x2_strides[3]])
        : static_cast<float>(x[long(b) * x_strides[0] + long(h) * x_strides[1]
                               + long(l) * x_strides[2] + long(i) * x_strides[3]]);
""", """
      if (INPLACE) {
        const long t = long(pos[0]) + l;
        if (second) {
          const long at = long(b) * vb1_strides[0] + long(h) * vb1_strides[1]
                          + t * vb1_strides[2] + i;
          ((KV_DEV uint32_t*)vb1)[at] = w1;
          if (MODE == 1) ((KV_DEV uint32_t*)vb2)[at] = w2;
        } else {
          const long at = long(b) * kb1_strides[0] + long(h) * kb1_strides[1]
                          + t * kb1_strides[2] + i;
          ((KV_DEV uint32_t*)kb1)[at] = w1;
          if (MODE == 1) ((KV_DEV uint32_t*)kb2)[at] = w2;
        }
      } else if (second) {
        codes1b[long(vec) * W + i] = w1;
        if (MODE == 1) codes2b[long(vec) * W + i] = w2;
      } else {
        codes1[long(vec) * W + i] = w1;
        if (MODE == 1) codes2[long(vec) * W + i] = w2;
      }
""", """
      if (INPLACE) {
        const long t = long(pos[0]) + l;
        if (second)
          ((KV_DEV NORMT*)vbn)[long(b) * vbn_strides[0] + long(h) * vbn_strides[1]
                               + t * vbn_strides[2]] = r16;
        else
          ((KV_DEV NORMT*)kbn)[long(b) * kbn_strides[0] + long(h) * kbn_strides[1]
                               + t * kbn_strides[2]] = r16;
      } else if (second) {
        rhob[vec] = r16;
      } else {
        rho[vec] = r16;
      }
""") + """
  }
"""

# The in-place launch's only output is ``done`` (one word): ENCODE_BODY's six output names,
# written only where INPLACE is 0 (never in this launch), all name it, so MLX allocates
# and tracks one output instead of six (each costs the host ~2 µs a call).
ENCODE_IN_PLACE_OUTPUTS = """
#define codes1 ((KV_DEV uint32_t*)done)
#define codes2 ((KV_DEV uint32_t*)done)
#define codes1b ((KV_DEV uint32_t*)done)
#define codes2b ((KV_DEV uint32_t*)done)
#define rho ((KV_DEV NORMT*)done)
#define rhob ((KV_DEV NORMT*)done)
"""

# ---------------------------------------------------------------- tensor-core decode
# Matrix-unit helpers for DECODE_MMA_BODY, appended to the backend header of that kernel
# only. One warp computes C (16x8, fp32) += A (16x16, fp16) B (16x8, fp16). Fragments are
# uint32 words holding two fp16 (low half = lower k). A lane owns, with G = KV_MG(lane) in
# 0..7 and L = KV_ML(lane) in 0..3 (a bijection of the 32 lanes):
#   a[0]: A[G][2L, 2L+1]   a[1]: A[G+8][2L, 2L+1]   a[2]: A[G][2L+8, 2L+9]   a[3]: A[G+8][..]
#   c[0], c[1]: C[G][2L], C[G][2L+1]                c[2], c[3]: C[G+8][2L], C[G+8][2L+1]
# B is opaque: kv_load_b fills it from shared memory (B[k][n] = p[k*ldk + n*ldn]).
# KV_GX0..2: the lane xor-masks that change G and keep L (a reduction over G).
# CUDA: mma.sync m16n8k16 (its documented fragment layout). Metal: four 8x8
# simdgroup_matrix products per call (A[G][2L..] is where thread_elements() keeps a lane's
# two elements of an 8x8 block).
CUDA_MMA_HEADER = """
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
"""

# MLX writes the kernel's declaration itself, after the header: launch bounds reach it only
# through the __global__ macro. With (NT, 4) the mma kernel keeps to 128 registers, so 4
# blocks share an SM and the 528-block grid is one wave on the H100 (at 144 registers,
# 3 per SM: 82.5 instead of ~76 µs at 128k, 3 bits).
CUDA_LAUNCH_BOUNDS = """
#undef __global__
#define __global__ __attribute__((global)) __launch_bounds__({nt}, {blocks})
"""

METAL_MMA_HEADER = """
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
"""

# Split-K decode attention on the matrix units, for mse keys and values of KB, VB <= 4
# bits with Hadamard rotations, no fp16 window, mask None/causal, and at most 8 query rows
# per KV head (GQ*QL <= 8: the mma's n). Same grid, partials and combine kernel as
# DECODE_BODY (RB = 8 rows, one row group). Each warp runs its own online softmax over
# 16-key sub-tiles (keys start + 16*warp, then every 16*NW), and the block merges its warps
# at the end; no block barrier inside the loop.
#
# Codes become mma fragments by *pair tables* (kpt, vpt: decode.pair_table): entry x is
# (c[x & m], c[x >> KB]) as two fp16, so the 2*KB bits of two adjacent codes index one
# 32-bit fragment word. Each entry is repeated 2^KREPL times and lane l reads copy
# l mod 2^KREPL, so the 32 lanes' lookups never collide on a shared-memory bank
# (2^KREPL = 32) or rarely (16). The block copies both tables to shared memory, making the
# copies (reading 2^KREPL times fewer global words: ~16 KB a block at 3 bits before).
#   Scores S (16 keys x 8 rows) = K~ Q~ᵀ: A = the codes of keys G, G+8; the lane with
#   class L reads the contiguous quarter [L*D/4, (L+1)*D/4) of their code words, so mma
#   step s (of D/16) takes dims L*D/4 + 4s + {0,1} (pair L) and + {2,3} (pair L+4): the
#   k axis is a fixed permutation of the dims, applied to the query rows when the block
#   stages them as B. ρ_key scales the fp32 result.
#   Values O (DV x 8 rows) += Ṽᵀ Pᵀ: A = value codes, pairs of keys (2L, 2L+1) and
#   (2L+8, 2L+9) at one dim; lane group G owns the DV/8 contiguous dims [G*DV/8, ...), tile
#   t's rows G and G+8 are dims G*DV/8 + 2t and + 2t + 1 (at most 64 code bits per key
#   and lane: two words and one funnel shift). P (with ρ_value folded in) goes to B
#   through a per-warp shared tile.

def repeat_copy(dst: str, src: str, n: str, repl: str) -> str:
    """Kernel text: shared ``dst[0, n)`` = each word of ``src`` repeated 2^``repl`` times,
    four copies per 128-bit store where there are four."""
    return f"""  if ({repl} >= 2) {{
    for (int e = kv_tid; e < {n} / 4; e += NT) kv_store4({dst} + 4 * e, {src}[(4 * e) >> {repl}]);
  }} else {{
    for (int e = kv_tid; e < {n}; e += NT) {dst}[e] = {src}[e >> {repl}];
  }}
"""


def mma_loads(p: str, j0: str, guarded: bool = True) -> str:
    """Kernel text: the global loads of the mma kernel's sub-tile at key ``j0`` into the
    registers named with prefix ``p`` (key code quarters, value code words, norms).
    ``guarded``: keys at or past ``end`` read as zeros; else the caller knows the 16 keys
    are below ``end``."""
    def g(j, expr, zero="0u"):
        return f"{j} < end ? {expr} : {zero}" if guarded else expr
    vtwo = "(j < end && vtwo)" if guarded else "vtwo"
    return f"""    {{
      const int ja_ = {j0} + G;
      const int jb_ = ja_ + 8;
#pragma unroll
      for (int w = 0; w < KQW; ++w) {{
        {p}ka[w] = {g("ja_", "kc[kbase + long(ja_) * WK + Lc * KQW + w]")};
        {p}kb[w] = {g("jb_", "kc[kbase + long(jb_) * WK + Lc * KQW + w]")};
      }}
      {p}rha = {g("ja_", "KV_H2F(kn[knb + ja_])", "0.0f")};
      {p}rhb = {g("jb_", "KV_H2F(kn[knb + jb_])", "0.0f")};
      {p}vra = {g("ja_", "KV_H2F(vn[vnb + ja_])", "0.0f")};
      {p}vrb = {g("jb_", "KV_H2F(vn[vnb + jb_])", "0.0f")};
#pragma unroll
      for (int u = 0; u < 4; ++u) {{
        const int j = {j0} + 2 * Lc + (u & 1) + 8 * (u >> 1);
        const long o = vbase + long(j) * WV + vw0;
        {p}vw[2 * u] = {g("j", "vc[o]")};
        {p}vw[2 * u + 1] = {vtwo} ? vc[o + 1] : 0u;
      }}
    }}
"""


def mma_tile(masked: bool) -> str:
    """Kernel text: one 16-key sub-tile at ``j0`` of the mma kernel, from the registers
    of the current sub-tile (ka, kb, vw, rha, rhb, vra, vrb) into the running softmax and
    the value accumulators. ``masked``: keys at or past ``end`` (and, causal, after a
    row's position) get no weight; else the caller knows all 16 keys count, so there is
    no mask and no -inf case (m_run = -inf before the first sub-tile gives e^-inf = 0)."""
    def live(x, m):
        return f"(({x} == KV_NEG_INF) ? 0.0f : KV_EXP({x} - {m}))" if masked \
            else f"KV_EXP({x} - {m})"
    mask = """#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = (e < 2) ? ja : jb;
      bool ok = j < end;
      if (MASK == 1) ok = ok && j <= S - QL + (2 * Lc + (e & 1)) % QL;
      if (!ok) s4[e] = KV_NEG_INF;
    }
""" if masked else ""
    return """    const int ja = j0 + G;
    const int jb = ja + 8;
    // ---- scores of keys ja, jb for rows 2Lc, 2Lc+1 (two mma chains) ----
    float sc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < KS; ++s) {
      uint32_t a[4];
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        // The pair's 2*KB bits, shifted straight to their byte offset in the table
        // (x 4 bytes x 2^KREPL copies): a funnel shift and one mask-and-or per lookup.
        const int bit = (4 * s + 2 * jj) * KB;
        const int wi = bit >> 5;
        const int sh = (bit & 31) - TSH;
        const uint32_t ha = (wi + 1 < KQW) ? ka[wi + 1 < KQW ? wi + 1 : wi] : 0u;
        const uint32_t hb = (wi + 1 < KQW) ? kb[wi + 1 < KQW ? wi + 1 : wi] : 0u;
        const uint32_t xa = KV_FIELD((uint64_t(ha) << 32) | ka[wi], sh);
        const uint32_t xb = KV_FIELD((uint64_t(hb) << 32) | kb[wi], sh);
        a[2 * jj] = KV_TAB_LOAD(TALIGN, tabl, xa & (KPM << TSH));
        a[2 * jj + 1] = KV_TAB_LOAD(TALIGN, tabl, xb & (KPM << TSH));
      }
      kv_mma(sc + 4 * (s & 1), a, bq[s]);
    }
    float s4[4] = {(sc[0] + sc[4]) * rha, (sc[1] + sc[5]) * rha, (sc[2] + sc[6]) * rhb,
                   (sc[3] + sc[7]) * rhb};
""" + mask + """
    // ---- online softmax per row (rows 2Lc, 2Lc+1, spread over the 8 lanes of a G) ----
    // Lazy rescale: the running maxima move, and the accumulators are rescaled, only when
    // some lane's score passes its row's running maximum by more than RESC = ln 16 (one
    // warp vote on the lanes' own maxima: the row maxima by shuffles only then);
    // otherwise P = e^(s - m_run) <= 16, which fp16 holds with the value norms folded in.
    // Most sub-tiles after the first skip the shuffles, the 4*MT multiplies and two exps.
    float mx0 = KV_MAX(s4[0], s4[2]);
    float mx1 = KV_MAX(s4[1], s4[3]);
    if (KV_WARP_ANY(mx0 > m_run[0] + RESC || mx1 > m_run[1] + RESC)) {
      mx0 = KV_MAX(mx0, KV_SHFL_XOR(mx0, KV_GX0));
      mx1 = KV_MAX(mx1, KV_SHFL_XOR(mx1, KV_GX0));
      mx0 = KV_MAX(mx0, KV_SHFL_XOR(mx0, KV_GX1));
      mx1 = KV_MAX(mx1, KV_SHFL_XOR(mx1, KV_GX1));
      mx0 = KV_MAX(mx0, KV_SHFL_XOR(mx0, KV_GX2));
      mx1 = KV_MAX(mx1, KV_SHFL_XOR(mx1, KV_GX2));
      const float mn0 = KV_MAX(m_run[0], mx0);
      const float mn1 = KV_MAX(m_run[1], mx1);
      const float al0 = """ + live("m_run[0]", "mn0") + """;
      const float al1 = """ + live("m_run[1]", "mn1") + """;
      m_run[0] = mn0;
      m_run[1] = mn1;
      l_run[0] *= al0;
      l_run[1] *= al1;
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        acc[4 * t] *= al0;
        acc[4 * t + 1] *= al1;
        acc[4 * t + 2] *= al0;
        acc[4 * t + 3] *= al1;
      }
    }
    const float p0a = """ + live("s4[0]", "m_run[0]") + """;
    const float p1a = """ + live("s4[1]", "m_run[1]") + """;
    const float p0b = """ + live("s4[2]", "m_run[0]") + """;
    const float p1b = """ + live("s4[3]", "m_run[1]") + """;
    l_run[0] += p0a + p0b;
    l_run[1] += p1a + p1b;
    // ---- P (x value norms) -> B, through this warp's shared tile [key][row] ----
    pw[G * RB + 2 * Lc] = p0a * vra;
    pw[G * RB + 2 * Lc + 1] = p1a * vra;
    pw[(G + 8) * RB + 2 * Lc] = p0b * vrb;
    pw[(G + 8) * RB + 2 * Lc + 1] = p1b * vrb;
    KV_WARP_SYNC();
    uint32_t bp[2];
    kv_load_b(bp, pw, RB, 1, kv_lane);
    KV_WARP_SYNC();

    // ---- values: keys j0+2Lc+{0,1} (pair Lc) and j0+2Lc+{8,9} (pair Lc+4) ----
    uint64_t xv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) xv[u] = ((uint64_t(vw[2 * u + 1]) << 32) | vw[2 * u]) >> voff;
    // Pair streams of keys (2Lc, 2Lc+1) and (2Lc+8, 2Lc+9): the two keys' codes of a dim
    // side by side (the first key's low), the even dims in ze, the odd ones in zo, so field
    // t (2*VB bits at 2*VB*t) is the pair-table entry of dim 2t / 2t+1: two bit-selects
    // and two shifts per stream, then a lookup is a shift, a mask-or and the load (merging
    // the two keys' fields at each lookup took two shifts and two masks).
    uint64_t ze[2], zo[2];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      ze[p] = (xv[2 * p] & vsel) | ((xv[2 * p + 1] << VB) & ~vsel);
      zo[p] = ((xv[2 * p] >> VB) & vsel) | (xv[2 * p + 1] & ~vsel);
    }
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      uint32_t a[4];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int sh = 2 * VB * t - VSH;
        const uint32_t o01 = KV_FIELD(hh ? zo[0] : ze[0], sh) & (VPM << VSH);
        const uint32_t o23 = KV_FIELD(hh ? zo[1] : ze[1], sh) & (VPM << VSH);
        a[hh] = KV_TAB_LOAD(TALIGN, vtabl, o01);
        a[2 + hh] = KV_TAB_LOAD(TALIGN, vtabl, o23);
      }
      kv_mma(acc + 4 * t, a, bp);
    }
#pragma unroll
    for (int w = 0; w < KQW; ++w) { ka[w] = nka[w]; kb[w] = nkb[w]; }
#pragma unroll
    for (int u = 0; u < 8; ++u) vw[u] = nvw[u];
    rha = nrha; rhb = nrhb; vra = nvra; vrb = nvrb;
"""


MMA_SETUP = """
// Bits of the 64-bit x from bit s on (s < 0: shifted up by -s), as 32 bits; s is a
// compile-time constant after unrolling, so this is one shift (a funnel shift for s > 0).
#define KV_FIELD(x, s) ((s) >= 0 ? uint32_t((x) >> ((s) >= 0 ? (s) : 0)) \\
                                 : uint32_t(x) << ((s) >= 0 ? 0 : -(s)))
  constexpr int NW = NT / 32;
  constexpr int RB = 8;
  constexpr int KS = D / 16;
  constexpr int MT = DV / 16;
  constexpr int KQ = D / 4;
  constexpr int KQW = KQ * KB / 32;         // code words of a key quarter (whole words)
  constexpr int VG = DV / 8;
  constexpr uint32_t KPM = (1u << (2 * KB)) - 1u;
  constexpr uint32_t VM = (1u << VB) - 1u;
  constexpr uint32_t VPM = (1u << (2 * VB)) - 1u;
  constexpr float RESC = 2.7725887f;        // ln 16: see the lazy rescale in the loop
  constexpr int KTN = (1 << (2 * KB)) << KREPL;
  constexpr int VTN = (1 << (2 * VB)) << VREPL;
  // TALIGN: both tables start at a multiple of TAL words (the larger table's size, a
  // power of two), so a lookup's address is the lane's base *or* the entry's offset (see
  // below): up to TAL words of padding in front, the key table, the value table at +TAL.
  // TALIGN = 0 (where that does not fit with as many copies): the tables back to back.
  constexpr int TAL = KTN > VTN ? KTN : VTN;
  constexpr int TNEED = TALIGN ? 3 * TAL : KTN + VTN + 3;
  constexpr int TABW = (TNEED > NW * RB * DV) ? TNEED : NW * RB * DV;
  KV_SHARED uint32_t tabs[TABW];
  KV_SHARED float qs[RB * D];
  KV_SHARED float qb[D * RB];
  KV_SHARED float pst[NW * 16 * RB];
  KV_SHARED float red_m[NW * RB];
  KV_SHARED float red_l[NW * RB];
  KV_TG uint32_t* ktab = tabs + KV_TAB_PAD(tabs, TALIGN ? TAL : 4);
  KV_TG uint32_t* vtab = ktab + (TALIGN ? TAL : KTN);

  const int split = kv_bx;
  const int nsp = kv_nbx;
  // LIVE: kc/kn/vc/vn are the cache's whole buffers, written in place this step (the
  // fused encode's INPLACE; dep orders this launch after it): the keys held are nk[1].
  const int S = LIVE ? int(nk[1]) : int(kn_shape[2]);
  const int H = int(kn_shape[1]);
  const int b = kv_by / H;
  const int h = kv_by - b * H;
  int chunk = (S + nsp - 1) / nsp;
  chunk = ((chunk + NT - 1) / NT) * NT;
  const int start = split * chunk;
  const int end = KV_MIN(S, start + chunk);
"""

def append_vector(x: str, tab: str, bits: str, words: str, codes: str, norm: str) -> str:
    """Kernel text for MMA_APPEND: this block's row (b, h) of the new vector ``x`` coded
    with the encode table ``tab`` at ``bits`` (``words`` code words) into token ``tok`` of
    the buffers ``codes`` and ``norm``."""
    def at(a, last):
        return (f"long(b) * {a}_strides[0] + long(h) * {a}_strides[1] + long({last}) * "
                f"{a}_strides[{3 if a == x else 2}]")
    return ("""      {
        constexpr int BITS = $B;
        constexpr int NL = 1 << $B;
        constexpr int W = $W;
        const KV_DEV float* tab = $T + D;
        const float sgn = $T[i];
        const float hs = $T[D + 4 * NL];
""".replace("$B", bits).replace("$W", words).replace("$T", tab)
        + code_vector(f"        const float v = static_cast<float>({x}[{at(x, 'i')}]);\n",
                      f"        ((KV_DEV uint32_t*){codes})[{at(codes, 'tok')} + i] = w1;\n",
                      f"        ((KV_DEV NORMT*){norm})[{at(norm, 'tok')}] = r16;\n")
        + "      }\n")


# APPEND (the steady decode step of one token, CUDA): the attention launch codes the new
# token itself, with no launch of its own (batch-1 decode waits on host time per graph
# node, and on the GPU the append took 4-6 µs plus a gap). Goes between MMA_SETUP and
# MMA_MAIN. The block whose split holds the token (position tok = nk[0], the last of the
# S = nk[1] held) codes its key knew and value vnew (B, Hkv, 1, D, any float dtype,
# read through strides) as ENCODE_BODY does (mse, tables ck/cv = encode.consts) into the
# buffers kc/kn and vc/vn before it reads them; no other block reads that token, and the
# block barrier that ends the coding makes the writes visible to the block's own loads.
# Needs D == DV == NT (a thread per coordinate; NW = D / 32 warps). The shared query
# arrays, not yet filled, hold the scratch: xs and red in qs, the codes in qb.
MMA_APPEND = """
  static_assert(D == NT && DV == NT, "the appending launch codes with a thread per dim");
  {
    const int tok = int(nk[0]);
    if (tok >= start && tok < end) {
      const int i = kv_tid;
      constexpr int MODE = 0;
      const float rs = 1.0f;
      KV_TG float* xs = qs;
      KV_TG float* red = qs + D;
      KV_TG uint32_t* cs1 = (KV_TG uint32_t*)qb;
      KV_TG uint32_t* cs2 = cs1;
""" + append_vector("knew", "ck", "KB", "WK", "kc", "kn") \
    + append_vector("vnew", "cv", "VB", "WV", "vc", "vn") + """    }
  }
"""

# The appending launch's constant tables arrive as one input, cdata (uint32 words:
# decode.merged_tables), at the offsets its template names: a kernel input costs the host
# ~0.7 µs a call to build and queue (MLX, H200 machine), and batch-1 decode waits on the
# host. The names the shared text reads become views of it.
APPEND_TABLES = """
#define qmul ((const KV_DEV float*)(cdata + TQMUL))
#define kpt (cdata + TKPT)
#define vpt (cdata + TVPT)
#define vmul ((const KV_DEV float*)(cdata + TVMUL))
#define ck ((const KV_DEV float*)(cdata + TCK))
#define cv ((const KV_DEV float*)(cdata + TCV))
"""

MMA_MAIN = """
  // ---- query rows (row g*QL + l; rows past GQ*QL are zero) x signs*scale/sqrt(D) ----
  for (int e = kv_tid; e < RB * D; e += NT) {
    const int r = e / D;
    const int i = e - r * D;
    float v = 0.0f;
    if (r < GQ * QL) {
      const int g = r / QL;
      const int l = r - g * QL;
      v = static_cast<float>(q[long(b) * q_strides[0] + long(h * GQ + g) * q_strides[1]
                               + long(l) * q_strides[2] + i]) * qmul[i];
    }
    qs[e] = v;
  }
  // ---- pair tables (built once per codec by the dispatcher), each word repeated: four
  //      copies per 128-bit store where there are four (a word-by-word copy with its
  //      loads cost ~4% of the H100 samples at 128k) ----
""" + repeat_copy("ktab", "kpt", "KTN", "KREPL") + repeat_copy("vtab", "vpt", "VTN", "VREPL") + """  KV_BARRIER();
""" + rows_hadamard("qs", "D", "GQ * QL") + """   // (the padding rows stay zero)
  // ---- B staging of the rotated rows: k index kk of step s is dim
  //      (P & 3) * KQ + 4s + 2 (P >> 2) + (kk & 1), P = kk >> 1 ----
  for (int e = kv_tid; e < D * RB; e += NT) {
    const int n = e % RB;
    const int k = e / RB;
    const int s = k >> 4;
    const int kk = k & 15;
    const int P = kk >> 1;
    qb[e] = qs[n * D + (P & 3) * KQ + 4 * s + 2 * (P >> 2) + (kk & 1)];
  }
  KV_BARRIER();

  const int G = KV_MG(kv_lane);
  const int Lc = KV_ML(kv_lane);
  // Tables read through byte offsets: entry x, copy c at 4 * (x * 2^REPL + c).
  constexpr int TSH = KREPL + 2;
  constexpr int VSH = VREPL + 2;
  // This lane's copy of each table (byte offset 4 * (lane mod 2^REPL)) in its base
  // address; entry offsets have no bits in common with an aligned base, so a lookup is a
  // shift, one mask-or and the load (KV_TAB_LOAD: on CUDA one ld.shared at base | offset;
  // plain pointer arithmetic took two more instructions per lookup).
  KV_TAB_BASE tabl = KV_TAB_ADDR(ktab) + ((kv_lane & ((1 << KREPL) - 1)) << 2);
  KV_TAB_BASE vtabl = KV_TAB_ADDR(vtab) + ((kv_lane & ((1 << VREPL) - 1)) << 2);
  uint32_t bq[KS][2];
#pragma unroll
  for (int s = 0; s < KS; ++s) kv_load_b(bq[s], qb + s * 16 * RB, RB, 1, kv_lane);

  const long kbase = long(b) * kc_strides[0] + long(h) * kc_strides[1];
  const long vbase = long(b) * vc_strides[0] + long(h) * vc_strides[1];
  const long knb = long(b) * kn_strides[0] + long(h) * kn_strides[1];
  const long vnb = long(b) * vn_strides[0] + long(h) * vn_strides[1];
  // This lane's value code bits: [G*VG*VB, +VG*VB) of each key, inside words vw0, vw0+1.
  const int vbit = G * VG * VB;
  const int vw0 = vbit >> 5;
  const int voff = vbit & 31;
  const bool vtwo = vw0 + 1 < WV;
  // VB ones every 2*VB bits: where set, a pair stream takes the first key's bits.
  uint64_t vsel = 0;
  for (int k = 0; 2 * VB * k < 64; ++k) vsel |= uint64_t(VM) << (2 * VB * k);
  KV_TG float* pw = pst + kv_warp * 16 * RB;

  float m_run[2] = {KV_NEG_INF, KV_NEG_INF};
  float l_run[2] = {0.0f, 0.0f};
  float acc[MT * 4];
#pragma unroll
  for (int k = 0; k < MT * 4; ++k) acc[k] = 0.0f;

  // Registers of the current sub-tile; the next one's loads are issued before the
  // current one is computed (the loop is latency-bound otherwise).
  uint32_t ka[KQW], kb[KQW], vw[8], nka[KQW], nkb[KQW], nvw[8];
  float rha, rhb, vra, vrb, nrha, nrhb, nvra, nvrb;
""" + mma_loads("", "start + 16 * kv_warp") + """
  // Interior sub-tiles: this one and the next whole and unmasked (keys below endm), so
  // no load guards, masks or -inf cases; the edge loop takes the rest (~1 per warp).
  const int endm = (MASK == 1) ? KV_MIN(end, S - QL + 1) : end;
  int j0 = start + 16 * kv_warp;
  for (; j0 + 16 * NW + 16 <= endm; j0 += 16 * NW) {
""" + mma_loads("n", "j0 + 16 * NW", guarded=False) + mma_tile(masked=False) + """  }
  for (; j0 < end; j0 += 16 * NW) {
""" + mma_loads("n", "j0 + 16 * NW") + mma_tile(masked=True) + """  }

  // ---- merge the warps: l summed over G, then over warps at the block maximum ----
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float lv = l_run[e];
    lv += KV_SHFL_XOR(lv, KV_GX0);
    lv += KV_SHFL_XOR(lv, KV_GX1);
    lv += KV_SHFL_XOR(lv, KV_GX2);
    l_run[e] = lv;
  }
  if (G == 0) {
    red_m[kv_warp * RB + 2 * Lc] = m_run[0];
    red_m[kv_warp * RB + 2 * Lc + 1] = m_run[1];
    red_l[kv_warp * RB + 2 * Lc] = l_run[0];
    red_l[kv_warp * RB + 2 * Lc + 1] = l_run[1];
  }
  KV_BARRIER();   // also: every warp is past its table reads, tabs may be reused
  float fw[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float M = KV_NEG_INF;
    for (int w = 0; w < NW; ++w) M = KV_MAX(M, red_m[w * RB + 2 * Lc + e]);
    fw[e] = (m_run[e] == KV_NEG_INF) ? 0.0f : KV_EXP(m_run[e] - M);
  }
  KV_TG float* osh = (KV_TG float*)tabs;
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int n = 2 * Lc + (e & 1);
      const int d = G * VG + 2 * t + (e >> 1);
      osh[(kv_warp * RB + n) * DV + d] = acc[4 * t + e] * fw[e & 1];
    }
  KV_BARRIER();
  const long pidx = long(kv_by) * nsp + split;
  // Only the GQ*QL rows that exist: the combine never reads the padding rows' partials.
  for (int e = kv_tid; e < GQ * QL * DV; e += NT) {
    float o = 0.0f;
    for (int w = 0; w < NW; ++w) o += osh[w * RB * DV + e];
    opart[pidx * RB * DV + e] = o;
  }
  if (kv_tid < RB) {
    float M = KV_NEG_INF;
    for (int w = 0; w < NW; ++w) M = KV_MAX(M, red_m[w * RB + kv_tid]);
    float lt = 0.0f;
    for (int w = 0; w < NW; ++w) {
      const float m = red_m[w * RB + kv_tid];
      if (m != KV_NEG_INF) lt += KV_EXP(m - M) * red_l[w * RB + kv_tid];
    }
    mpart[pidx * RB + kv_tid] = M;
    lpart[pidx * RB + kv_tid] = lt;
  }
"""

DECODE_MMA_BODY = MMA_SETUP + MMA_MAIN

# FOLD: the split-K combine (REDUCE_BODY's work, with ROTV) done by the decode launch
# itself, appended to DECODE_MMA_BODY for the steady decode step: batch-1 decode waits on
# host time per graph node, and this drops one of a layer's three. In two levels: each
# block counts itself done on its group's counter (after a device fence, so its partials
# are visible first); the block that counts last in a group of FOLD_GROUP splits merges
# the group's partials into the group's first one, then counts the group done on the
# row's counter; the block that counts last there merges the groups, applies
# Π_Vᵀ = H_DV · vmul and writes out (B, Hq, QL, DV) in OT. (One level took 5-9 µs after
# the row's last block at 32k-128k, a chain of ~5 L2 round trips over 65 splits.) Every
# merger resets the counter it won. A merging block's warps each take a share of the
# slots for every row (loads of UK slots in flight), then the warps' results are merged
# through shared memory. A lane owns dims d = lane * FE + j, so H_DV is FE-point
# butterflies in registers and 32-point ones across lanes. cnt (decode.fold_counters):
# one uint32 a row, then per row one a group, zero between launches; launches that share
# counters must be ordered (one cache's steps are: each needs the previous token).
# The folded launch's partials live in one scratch output ``part`` (an output costs the
# host ~2 µs a call): [opart | mpart | lpart] for all (row, split) blocks.
MMA_FOLD_PARTS = """
#define opart part
#define mpart (part + long(kv_nby) * kv_nbx * RB * DV)
#define lpart (part + long(kv_nby) * kv_nbx * RB * (DV + 1))
"""
FOLD_GROUP = 16   # splits a block of the first merge level combines (MMA_FOLD_TAIL)
MMA_FOLD_TAIL = """
  KV_SHARED int last_block[1];
  // Two levels: the last block of each group of FGS splits merges the group into the
  // group's first partial; the last of those merges the groups and writes out. After
  // the last block's loop, the chain is two short merges instead of one of every split.
  constexpr int FE = DV / 32;
  constexpr int NR = GQ * QL;
  constexpr int FGS = """ + str(FOLD_GROUP) + """;
  const int ng = (nsp + FGS - 1) / FGS;
  const int grp = split / FGS;
  // cnt: a counter per row, then per row one per group (cnt_shape[0] sets how many).
  const int ngc = (int(cnt_shape[0]) - kv_nby) / kv_nby;
  const long gci = kv_nby + long(kv_by) * ngc + grp;
  KV_DEVICE_FENCE();
  KV_BARRIER();
  if (kv_tid == 0)
    last_block[0] = KV_ATOMIC_INC(cnt, gci) == uint32_t(KV_MIN(FGS, nsp - grp * FGS) - 1);
  KV_BARRIER();
  for (int level = 0; level < 2 && last_block[0]; ++level) {
    KV_DEVICE_FENCE();
    // slots t < count of this merge: splits first + t * stride
    const int first = level == 0 ? grp * FGS : 0;
    const int stride = level == 0 ? 1 : FGS;
    const int count = level == 0 ? KV_MIN(FGS, nsp - first) : ng;
    const bool writes_out = level == 1 || ng == 1;
    // Rows in groups of RG, each warp's loads of UK splits x RG rows in flight together
    // (~72 floats a lane: the merge is a chain of L2 round trips, ~5 for 66 splits x 3
    // rows; one row at a time, 8 splits in flight, took 9).
    constexpr int RG0 = 32 / (FE + 2) > 0 ? 32 / (FE + 2) : 1;
    constexpr int RG = RG0 < NR ? RG0 : NR;
    constexpr int UK = (96 - RG * (FE + 2)) / (RG * (FE + 2)) > 0
                       ? (96 - RG * (FE + 2)) / (RG * (FE + 2)) : 1;
    const long rbase = long(kv_by) * nsp;
    KV_TG float* fsh = (KV_TG float*)tabs;     // NW * RB * DV floats (TABW holds them)
    for (int r0 = 0; r0 < NR; r0 += RG) {
      float M[RG], den[RG], num[RG * FE];
#pragma unroll
      for (int g = 0; g < RG; ++g) {
        M[g] = KV_NEG_INF;
        den[g] = 0.0f;
      }
#pragma unroll
      for (int j = 0; j < RG * FE; ++j) num[j] = 0.0f;
      for (int s0 = kv_warp; s0 < count; s0 += NW * UK) {
        float m[UK * RG], l[UK * RG], o[UK * RG * FE];
#pragma unroll
        for (int u = 0; u < UK; ++u) {
          const int t = s0 + u * NW;
          const long base = (rbase + first + (t < count ? t : s0) * stride) * RB + r0;
#pragma unroll
          for (int g = 0; g < RG; ++g) {
            const bool ok = t < count && r0 + g < NR;
            const long i = base + (r0 + g < NR ? g : 0);
            m[u * RG + g] = ok ? mpart[i] : KV_NEG_INF;
            l[u * RG + g] = ok ? lpart[i] : 0.0f;
            // A lane's FE floats are contiguous and 16-byte aligned: 128-bit loads where
            // FE allows (one request per warp instruction instead of four). i is always
            // a written partial (clamped above), so the loads need no guard.
#pragma unroll
            for (int j = 0; j < FE; j += (FE % 4 == 0 ? 4 : 1)) {
              const long src = i * DV + kv_lane * FE + j;
              const int dst = (u * RG + g) * FE + j;
              if (FE % 4 == 0) {
                const float4 v4 = *(KV_DEV const float4*)(opart + src);
                o[dst] = ok ? v4.x : 0.0f;
                o[FE % 4 == 0 ? dst + 1 : dst] = ok ? v4.y : 0.0f;
                o[FE % 4 == 0 ? dst + 2 : dst] = ok ? v4.z : 0.0f;
                o[FE % 4 == 0 ? dst + 3 : dst] = ok ? v4.w : 0.0f;
              } else {
                o[dst] = ok ? opart[src] : 0.0f;
              }
            }
          }
        }
#pragma unroll
        for (int g = 0; g < RG; ++g) {
          float mc = M[g];
#pragma unroll
          for (int u = 0; u < UK; ++u) mc = KV_MAX(mc, m[u * RG + g]);
          if (mc != KV_NEG_INF) {
            const float a = (M[g] == KV_NEG_INF) ? 0.0f : KV_EXP(M[g] - mc);
            den[g] *= a;
#pragma unroll
            for (int j = 0; j < FE; ++j) num[g * FE + j] *= a;
#pragma unroll
            for (int u = 0; u < UK; ++u) {
              const float mu = m[u * RG + g];
              const float w = (mu == KV_NEG_INF) ? 0.0f : KV_EXP(mu - mc);
              den[g] += w * l[u * RG + g];
#pragma unroll
              for (int j = 0; j < FE; ++j) num[g * FE + j] += w * o[(u * RG + g) * FE + j];
            }
            M[g] = mc;
          }
        }
      }
#pragma unroll
      for (int g = 0; g < RG; ++g) {
        const int r = r0 + g;
        if (r < NR) {
#pragma unroll
          for (int j = 0; j < FE; ++j)
            fsh[(kv_warp * RB + r) * DV + kv_lane * FE + j] = num[g * FE + j];
          if (kv_lane == 0) {
            red_m[kv_warp * RB + r] = M[g];
            red_l[kv_warp * RB + r] = den[g];
          }
        }
      }
    }
    KV_BARRIER();
    for (int r = kv_warp; r < NR; r += NW) {
      float M = KV_NEG_INF;
      for (int w = 0; w < NW; ++w) M = KV_MAX(M, red_m[w * RB + r]);
      float den = 0.0f;
      float x[FE];
#pragma unroll
      for (int j = 0; j < FE; ++j) x[j] = 0.0f;
      for (int w = 0; w < NW; ++w) {
        const float m = red_m[w * RB + r];
        if (m != KV_NEG_INF) {
          const float f = KV_EXP(m - M);
          den += f * red_l[w * RB + r];
#pragma unroll
          for (int j = 0; j < FE; ++j) x[j] += f * fsh[(w * RB + r) * DV + kv_lane * FE + j];
        }
      }
      if (!writes_out) {          // the group's partial, in place of its first split's
        const long i = (rbase + first) * RB + r;
#pragma unroll
        for (int j = 0; j < FE; ++j) opart[i * DV + kv_lane * FE + j] = x[j];
        if (kv_lane == 0) {
          mpart[i] = M;
          lpart[i] = den;
        }
        continue;
      }
#pragma unroll
      for (int j = 0; j < FE; ++j) x[j] = den > 0.0f ? x[j] / den : 0.0f;
#pragma unroll
      for (int hh = 1; hh < FE; hh <<= 1)
#pragma unroll
        for (int j = 0; j < FE; ++j)
          if ((j & hh) == 0) {
            const float u0 = x[j];
            const float u1 = x[j + hh];
            x[j] = u0 + u1;
            x[j + hh] = u0 - u1;
          }
      for (int hh = 1; hh < 32; hh <<= 1)
#pragma unroll
        for (int j = 0; j < FE; ++j) {
          const float y = KV_SHFL_XOR(x[j], hh);
          x[j] = (kv_lane & hh) ? y - x[j] : x[j] + y;
        }
      const int g = r / QL;
      const int l = r - g * QL;
      const long ob = (long(b * H * GQ + h * GQ + g) * QL + l) * DV + kv_lane * FE;
#pragma unroll
      for (int j = 0; j < FE; ++j) out[ob + j] = static_cast<OT>(x[j] * vmul[kv_lane * FE + j]);
    }
    // Counters back to zero for the next launch; a group's merger goes on to count
    // its group done for the row.
    if (kv_tid == 0) ((KV_DEV uint32_t*)cnt)[level == 0 ? gci : long(kv_by)] = 0u;
    if (writes_out) break;
    KV_DEVICE_FENCE();
    KV_BARRIER();
    if (kv_tid == 0) last_block[0] = KV_ATOMIC_INC(cnt, kv_by) == uint32_t(ng - 1) ? 1 : 0;
    KV_BARRIER();
  }
"""


# Fused dequantize (kernels/dequant.py): one thread a coordinate, a turboquant_mse vector's
# code times its stored norm, in the rotated domain, written in the model's dtype. Inputs
# are read through their strides (cache slices arrive without a copy); the last axis of
# ``codes`` is contiguous, as the packer writes it.
DEQUANT_BODY = """
  const int i = kv_bx * NTG + kv_tid;
  const int T = int(codes_shape[2]);
  const int H = int(codes_shape[1]);
  const int total = int(codes_shape[0]) * H * T * D;
  if (i < total) {
    const int r = i / D;
    const int d = i - r * D;
    const int t = r % T;
    const int h = (r / T) % H;
    const int b = r / (T * H);
    const int at = b * int(codes_strides[0]) + h * int(codes_strides[1])
                 + t * int(codes_strides[2]);
    const int bit = d * BITS;
    const int w = bit >> 5;
    const int s = bit & 31;
    uint32_t v = codes[at + w] >> s;
    if (s + BITS > 32) v |= codes[at + w + 1] << (32 - s);
    v &= (1u << BITS) - 1u;
    const float rho = KV_H2F(norm[b * int(norm_strides[0]) + h * int(norm_strides[1])
                                 + t * int(norm_strides[2])]);
    out[i] = OutT(cb[v] * rho);
  }
"""
