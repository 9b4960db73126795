/* SiLU-gated int4 experts computed straight from the bytes of the expert store.
 *
 * An expert block as exported for ONNX Runtime's MatMulNBits (4 bits, blocks of 64 along the
 * input, one float32 scale per block, no zero points: a weight is (nibble - 8) * scale; a
 * byte holds two neighbours, the even one in its low nibble) is used as read: no session to
 * build, nothing repacked, so a page-in costs a read. The arithmetic is MatMulNBits' at
 * accuracy level 4: activations quantized to int8 per block of 64 (scale max|x| / 127,
 * rounded to nearest even), int8 dot products (AVX-512 VNNI), float32 per-block scaling.
 *
 * Every output element is computed by one thread through the same sequence of operations
 * whatever the number of tokens, rows or threads, so results are bit-identical between a
 * one-token step and a prompt, and between budgets.
 *
 * Used through ctypes (mobilemoe/native_experts.py): plain C, no Python API.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
#else
#error "q4_experts.c needs x86-64 (AVX-512 VNNI); other machines run experts on ONNX Runtime"
#endif

#define BLK 64          /* weights per quantization block */
#define BLK_BYTES 32    /* int4 */
#define ROWS 4          /* output rows computed together (one activation load serves four) */
#define AHEAD_GROUPS 4  /* software prefetch distance, in groups of ROWS rows (measured: 2-6
                           alike, 12 slower; none: 9.5 instead of 14.5 GB/s from DRAM on two
                           threads). Into L2 (T1), not L1: a core has ~16 L1 fill buffers,
                           too few to keep DRAM busy (from DRAM, a layer's 8 experts 18.4
                           against 16.9 GB/s; into L1 without hinting, NTA: 11.5) */

int mm_cpu_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* Activations of T tokens, int8 per block: [T, nb * 64] with each block's even elements
   first and odd ones second (the order of its weights' low and high nibbles), the scales
   [T, nb], and offset = -8 * sum(q) per block: the nibbles are weights + 8, so a block's dot
   product of nibbles and q is that much too large (exact in int32). */
typedef struct {
  int8_t* q;
  float* scale;
  int32_t* offset;
  int nb;
} quantized;

/* x [k] -> one row of q (k padded with zeros to whole blocks). */
static void quantize_row(const float* x, int k, const quantized* a, int t) {
  int8_t* q = a->q + (size_t)t * a->nb * BLK;
  for (int b = 0; b < a->nb; ++b) {
    float block[BLK] = {0};
    const int n = k - b * BLK < BLK ? k - b * BLK : BLK;
    memcpy(block, x + b * BLK, (size_t)n * sizeof(float));
    float amax = 0.f;
    for (int i = 0; i < BLK; ++i) amax = fmaxf(amax, fabsf(block[i]));
    const float scale = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int i = 0; i < BLK / 2; ++i) {
      const int even = (int)nearbyintf(block[2 * i] * inverse);
      const int odd = (int)nearbyintf(block[2 * i + 1] * inverse);
      q[b * BLK + i] = (int8_t)even;
      q[b * BLK + BLK / 2 + i] = (int8_t)odd;
      sum += even + odd;
    }
    a->scale[(size_t)t * a->nb + b] = scale;
    a->offset[(size_t)t * a->nb + b] = -8 * sum;
  }
}

/* The 16 lanes' sum as a tree of 4 additions (_mm512_reduce_add_ps compiled to a chain). */
static inline __attribute__((always_inline)) KERNEL float sum_lanes(__m512 v) {
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(v),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  quarter = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
  quarter = _mm_add_ss(quarter, _mm_movehdup_ps(quarter));
  return _mm_cvtss_f32(quarter);
}

/* y[t, n + r] for r < NR rows and t0 <= t < t0 + TT tokens. NR and TT are constants at every
   call, so the loops unroll; each (row, token) pair sees the same operations in any tile. */
static inline __attribute__((always_inline)) KERNEL void tile(
    const uint8_t* w, const float* sw, const quantized* a, int n, int t0, float* y, int ldy,
    const int NR, const int TT, int rows_total) {
  const int nb = a->nb;
  const size_t rb = (size_t)nb * BLK_BYTES;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[ROWS][4];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_ps();
  const uint8_t* w0 = w + (size_t)n * rb;
  const float* s0 = sw + (size_t)n * nb;
  const int ahead = n + ROWS * AHEAD_GROUPS + NR <= rows_total;
  for (int b = 0; b < nb; ++b) {
    if (ahead && !(b & 1))  /* one cache line holds two blocks of a row */
      for (int r = 0; r < NR; ++r)
        _mm_prefetch((const char*)(w0 + (ROWS * AHEAD_GROUPS + r) * rb + b * BLK_BYTES), _MM_HINT_T1);
    __m512i v[ROWS];
    for (int r = 0; r < NR; ++r) {  /* 32 bytes -> 64 nibbles: low ones, then high ones */
      const __m256i raw = _mm256_loadu_si256((const __m256i*)(w0 + r * rb + b * BLK_BYTES));
      v[r] = _mm512_and_si512(
          _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1), low);
    }
    for (int t = 0; t < TT; ++t) {
      const __m512i q = _mm512_loadu_si512((const void*)(a->q + ((size_t)(t0 + t) * nb + b) * BLK));
      const float sa = a->scale[(size_t)(t0 + t) * nb + b];
      /* the dot products start from the block's offset, in lane 0: they come out exact */
      const __m512i start = _mm512_maskz_set1_epi32(1, a->offset[(size_t)(t0 + t) * nb + b]);
      for (int r = 0; r < NR; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(start, v[r], q);
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(s0[r * nb + b] * sa),
                                    acc[r][t]);
      }
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < NR; ++r) y[(size_t)(t0 + t) * ldy + n + r] = sum_lanes(acc[r][t]);
}

#define TILES(NR)                                                                            \
  static KERNEL void tiles_##NR(const uint8_t* w, const float* sw, const quantized* a, int n, \
                                int T, float* y, int ldy, int rows_total) {                  \
    int t = 0;                                                                               \
    for (; t + 4 <= T; t += 4) tile(w, sw, a, n, t, y, ldy, NR, 4, rows_total);              \
    switch (T - t) {                                                                         \
      case 3: tile(w, sw, a, n, t, y, ldy, NR, 3, rows_total); break;                        \
      case 2: tile(w, sw, a, n, t, y, ldy, NR, 2, rows_total); break;                        \
      case 1: tile(w, sw, a, n, t, y, ldy, NR, 1, rows_total); break;                        \
    }                                                                                        \
  }
TILES(1)
TILES(2)
TILES(3)
TILES(4)

/* y[:, n0..n1) = a @ W[n0..n1)^T, W [rows_total, nb * 32 bytes], y [T, ldy]. */
static void matmul_rows(const uint8_t* w, const float* sw, const quantized* a, int T, int n0,
                        int n1, float* y, int ldy, int rows_total) {
  int n = n0;
  for (; n + ROWS <= n1; n += ROWS) tiles_4(w, sw, a, n, T, y, ldy, rows_total);
  switch (n1 - n) {
    case 3: tiles_3(w, sw, a, n, T, y, ldy, rows_total); break;
    case 2: tiles_2(w, sw, a, n, T, y, ldy, rows_total); break;
    case 1: tiles_1(w, sw, a, n, T, y, ldy, rows_total); break;
  }
}

/* ---- persistent workers ----------------------------------------------------------------
   A job is split into as many parts as threads, and every thread, the caller included, claims
   parts until none is left: a worker that is not scheduled in time (ONNX Runtime's pool spins
   on the other cores after its own work) costs speed, never a wait. Which thread computes a
   part does not change its result. Between jobs the workers spin (a layer's experts follow
   each other within microseconds), until the runtime parks them or SPIN_ROUNDS pass. */

#define MAX_THREADS 64
/* _mm_pause()s a worker spins before it sleeps, unless parked first (mm_park, called by the
   runtime when a layer's experts are done): 40000 let a worker spin from one expert to the
   next in a decode step (4000 often did not: 38.6 against 34.9 ms of experts a token). */
#define SPIN_ROUNDS 40000

typedef void (*job_fn)(void* job, int part, int parts);

static struct {
  int threads;
  _Atomic unsigned generation;
  _Atomic int next_part; /* the next part to claim */
  _Atomic int done;      /* parts finished */
  _Atomic int parked;    /* set by mm_park: workers sleep now instead of spinning */
  job_fn fn;
  void* job;
  pthread_mutex_t lock;
  pthread_cond_t wake;
  int sleepers;
} pool = {.threads = 1, .next_part = MAX_THREADS, /* no job yet: nothing to claim */
            .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static void run_parts(void) {
  /* the load first: a worker woken by mm_wake, with no job, leaves the counter alone */
  for (int part; atomic_load(&pool.next_part) < pool.threads &&
                 (part = atomic_fetch_add(&pool.next_part, 1)) < pool.threads;) {
    pool.fn(pool.job, part, pool.threads);
    atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
  }
}

static void* worker_main(void* arg) {
  (void)arg;
  unsigned seen = atomic_load(&pool.generation);
  for (;;) {
    unsigned now;
    for (int spins = 0; (now = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen
                        && spins < SPIN_ROUNDS && !atomic_load_explicit(&pool.parked, memory_order_relaxed);
         ++spins)
      _mm_pause();
    if (now == seen) {
      pthread_mutex_lock(&pool.lock);
      ++pool.sleepers;
      while ((now = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
      --pool.sleepers;
      pthread_mutex_unlock(&pool.lock);
    }
    seen = now;
    run_parts();
  }
  return NULL;
}

/* The number of threads (the caller's included), once per process: 0 on success or if it is
   already `threads`, else the number already set (or -1 if threads could not start). */
int mm_set_threads(int threads) {
  static pthread_mutex_t once = PTHREAD_MUTEX_INITIALIZER;
  pthread_mutex_lock(&once);
  int result = 0;
  if (pool.threads != threads) {
    if (pool.threads > 1 || threads < 1 || threads > MAX_THREADS) {
      result = pool.threads;
    } else {
      for (int t = 1; t < threads && result == 0; ++t) {
        pthread_t worker;
        if (pthread_create(&worker, NULL, worker_main, NULL) != 0) result = -1;
        else pthread_detach(worker);
      }
      if (result == 0) pool.threads = threads;
    }
  }
  pthread_mutex_unlock(&once);
  return result;
}

/* The caller has no more work for a while (a layer's experts are done): the workers stop
   spinning and sleep, leaving their cores to ONNX Runtime's threads. */
void mm_park(void) { atomic_store(&pool.parked, 1); }

/* Experts are coming (the runtime is routing a layer): wake the workers now, so that the first
   expert does not wait for them (~85 us a layer). */
void mm_wake(void) {
  atomic_store(&pool.parked, 0);
  pthread_mutex_lock(&pool.lock);
  if (pool.sleepers) {
    atomic_fetch_add(&pool.generation, 1); /* wakes them with no job: nothing left to claim */
    pthread_cond_broadcast(&pool.wake);
  }
  pthread_mutex_unlock(&pool.lock);
}

static pthread_mutex_t running = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */

static void run_parallel(job_fn fn, void* job) {
  if (pool.threads == 1) {
    fn(job, 0, 1);
    return;
  }
  pool.fn = fn;
  pool.job = job;
  atomic_store(&pool.done, 0);
  atomic_store(&pool.next_part, 0);
  atomic_store(&pool.parked, 0);
  atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
  pthread_mutex_lock(&pool.lock);
  if (pool.sleepers) pthread_cond_broadcast(&pool.wake);
  pthread_mutex_unlock(&pool.lock);
  run_parts();
  while (atomic_load_explicit(&pool.done, memory_order_acquire) < pool.threads) _mm_pause();
}

/* ---- one expert: y = down(silu(gate(x)) * up(x)) ---------------------------------------- */

typedef struct {
  const uint8_t *gate_up, *down;
  const float *gate_up_scales, *down_scales;
  int hidden, inter, T;
  const float* x;
  float *h, *y;  /* h [T, 2 * inter]: gate outputs, then up outputs */
  quantized qx, qh;
} expert_job;

static void part_of(int n, int part, int parts, int* begin, int* end) {
  *begin = (int)((long)n * part / parts);
  *end = (int)((long)n * (part + 1) / parts);
}

static void quantize_input(void* p, int part, int parts) {
  expert_job* j = p;
  int begin, end;
  part_of(j->T, part, parts, &begin, &end);
  for (int t = begin; t < end; ++t) quantize_row(j->x + (size_t)t * j->hidden, j->hidden, &j->qx, t);
}

/* Row groups of ROWS go to the parts whole, so that no thread's rows depend on another's. */
static void gate_up(void* p, int part, int parts) {
  expert_job* j = p;
  const int rows = 2 * j->inter, groups = (rows + ROWS - 1) / ROWS;
  int begin, end;
  part_of(groups, part, parts, &begin, &end);
  matmul_rows(j->gate_up, j->gate_up_scales, &j->qx, j->T, begin * ROWS,
              end * ROWS < rows ? end * ROWS : rows, j->h, rows, rows);
}

/* silu(gate) * up, over the gate half, then quantized for the down projection. */
static void activate(void* p, int part, int parts) {
  expert_job* j = p;
  int begin, end;
  part_of(j->T, part, parts, &begin, &end);
  for (int t = begin; t < end; ++t) {
    float* g = j->h + (size_t)t * 2 * j->inter;
    const float* u = g + j->inter;
    for (int i = 0; i < j->inter; ++i) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    quantize_row(g, j->inter, &j->qh, t);
  }
}

static void down(void* p, int part, int parts) {
  expert_job* j = p;
  const int rows = j->hidden, groups = (rows + ROWS - 1) / ROWS;
  int begin, end;
  part_of(groups, part, parts, &begin, &end);
  matmul_rows(j->down, j->down_scales, &j->qh, j->T, begin * ROWS,
              end * ROWS < rows ? end * ROWS : rows, j->y, rows, rows);
}

/* Bytes of scratch an expert_job over T tokens needs, and its carving. */
static size_t scratch_bytes(int hidden, int inter, int T) {
  const int nbx = (hidden + BLK - 1) / BLK, nbh = (inter + BLK - 1) / BLK;
  const size_t floats = (size_t)T * (2 * (size_t)inter + 2 * nbx + 2 * nbh);
  return floats * sizeof(float) + (size_t)T * (nbx + nbh) * BLK + 64;
}

static void carve(expert_job* j, char* scratch) {
  const int T = j->T, nbx = (j->hidden + BLK - 1) / BLK, nbh = (j->inter + BLK - 1) / BLK;
  float* f = (float*)scratch;
  j->h = f;
  f += (size_t)T * 2 * j->inter;
  j->qx = (quantized){.scale = f, .offset = (int32_t*)(f + (size_t)T * nbx), .nb = nbx};
  f += (size_t)T * 2 * nbx;
  j->qh = (quantized){.scale = f, .offset = (int32_t*)(f + (size_t)T * nbh), .nb = nbh};
  f += (size_t)T * 2 * nbh;
  j->qx.q = (int8_t*)f;
  j->qh.q = j->qx.q + (size_t)T * nbx * BLK;
}

/* x [T, hidden] -> y [T, hidden], with gate_up [2 * inter, ceil(hidden / 64) * 32 bytes]
   (gate rows, then up rows) and its scales [2 * inter, ceil(hidden / 64)], down
   [hidden, ceil(inter / 64) * 32 bytes] and its scales [hidden, ceil(inter / 64)].
   Returns 0, or -1 when out of memory. Calls are serialized: the workers serve one at a time. */
int mm_q4_silu_expert(const uint8_t* gate_up_weights, const float* gate_up_scales,
                      const uint8_t* down_weights, const float* down_scales, int hidden,
                      int inter, int T, const float* x, float* y) {
  char* scratch = malloc(scratch_bytes(hidden, inter, T));
  if (!scratch) return -1;
  expert_job j = {
      .gate_up = gate_up_weights, .down = down_weights, .gate_up_scales = gate_up_scales,
      .down_scales = down_scales, .hidden = hidden, .inter = inter, .T = T, .x = x, .y = y,
  };
  carve(&j, scratch);
  pthread_mutex_lock(&running);
  if (T == 1) quantize_input(&j, 0, 1); else run_parallel(quantize_input, &j);
  run_parallel(gate_up, &j);
  if (T == 1) activate(&j, 0, 1); else run_parallel(activate, &j);
  run_parallel(down, &j);
  pthread_mutex_unlock(&running);
  free(scratch);
  return 0;
}

/* ---- one token through a layer's chosen experts: sum of weight * expert(x) -------------
   Each thread takes whole experts (no synchronization inside one), computed exactly as
   mm_q4_silu_expert computes them, and the caller then adds them up in the given order. */

typedef struct {
  const uint64_t* pointers; /* [count, 4]: gate_up, gate_up_scales, down, down_scales */
  int count, hidden, inter;
  const float* x;
  float* outputs; /* [count, hidden] */
  char* scratch;  /* one expert_job's per part */
  size_t scratch_per_part;
  _Atomic int next_expert;
} layer_job;

static void layer_part(void* p, int part, int parts) {
  (void)parts;
  layer_job* l = p;
  expert_job j = {.hidden = l->hidden, .inter = l->inter, .T = 1, .x = l->x};
  carve(&j, l->scratch + (size_t)part * l->scratch_per_part);
  int quantized_x = 0;
  for (int e; (e = atomic_fetch_add(&l->next_expert, 1)) < l->count;) {
    const uint64_t* w = l->pointers + 4 * (size_t)e;
    j.gate_up = (const uint8_t*)(uintptr_t)w[0];
    j.gate_up_scales = (const float*)(uintptr_t)w[1];
    j.down = (const uint8_t*)(uintptr_t)w[2];
    j.down_scales = (const float*)(uintptr_t)w[3];
    j.y = l->outputs + (size_t)e * l->hidden;
    if (!quantized_x++) quantize_input(&j, 0, 1);
    gate_up(&j, 0, 1);
    activate(&j, 0, 1);
    down(&j, 0, 1);
  }
}

/* One token x [hidden] through `count` experts (pointers [count, 4], as for
   mm_q4_silu_expert) -> out [hidden] = sum over e in order of weights[e] * expert_e(x),
   each term rounded to float32 and added in turn, as numpy's `out += w * y` does. A decode
   step's layer is then done with experts: the workers are parked (mm_park) before the sum.
   Returns 0, or -1 when out of memory. */
int mm_q4_silu_experts_sum(const uint64_t* pointers, const float* weights, int count, int hidden,
                           int inter, const float* x, float* out) {
  layer_job l = {.pointers = pointers, .count = count, .hidden = hidden, .inter = inter, .x = x};
  l.scratch_per_part = (scratch_bytes(hidden, inter, 1) + 63) / 64 * 64;
  l.outputs = malloc((size_t)count * hidden * sizeof(float));
  l.scratch = malloc(l.scratch_per_part * (size_t)pool.threads);
  if (!l.outputs || !l.scratch) {
    free(l.outputs);
    free(l.scratch);
    return -1;
  }
  pthread_mutex_lock(&running);
  run_parallel(layer_part, &l);
  pthread_mutex_unlock(&running);
  mm_park();
  for (int i = 0; i < hidden; ++i) out[i] = 0.f;
  for (int e = 0; e < count; ++e) {
    const float w = weights[e], *y = l.outputs + (size_t)e * hidden;
    for (int i = 0; i < hidden; ++i) out[i] += w * y[i]; /* built with -ffp-contract=off */
  }
  free(l.outputs);
  free(l.scratch);
  return 0;
}

/* ---- softmax routing --------------------------------------------------------------------- */

/* Router logits [T, E] -> the top k experts of each token [T, k] (best first, ties to the lower
   index) and their weights [T, k], with mobilemoe.routing.route's softmax semantics:
   probabilities over all experts, top k, optionally renormalized over those k
   (`normalize`); or (`top_k_first`) the top k logits, then a softmax over those k; then
   times `scaling`. float32 throughout, the sums in index order. The expert kernels run next,
   so this wakes their workers first (mm_wake): they are up when the first expert starts.
   Returns 0, or -1 if k is not in 1..E or E > 1024. */
int mm_route_softmax(const float* logits, int T, int E, int k, int normalize, int top_k_first,
                     float scaling, int64_t* experts, float* weights) {
  if (k < 1 || k > E || E > 1024) return -1;
  mm_wake();
  float p[1024];
  unsigned char taken[1024];
  for (int t = 0; t < T; ++t) {
    const float* l = logits + (size_t)t * E;
    int64_t* chosen = experts + (size_t)t * k;
    float* w = weights + (size_t)t * k;
    if (!top_k_first) {  /* p = softmax(l) */
      float top = l[0], sum = 0.f;
      for (int e = 1; e < E; ++e) top = l[e] > top ? l[e] : top;
      for (int e = 0; e < E; ++e) sum += p[e] = expf(l[e] - top);
      for (int e = 0; e < E; ++e) p[e] /= sum;
    } else {
      memcpy(p, l, (size_t)E * sizeof(float));
    }
    memset(taken, 0, (size_t)E);
    for (int j = 0; j < k; ++j) {  /* E * k comparisons: E is at most a few hundred */
      int best = -1;
      for (int e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
      taken[best] = 1;
      chosen[j] = best;
      w[j] = p[best];
    }
    if (top_k_first) {  /* a softmax over the k chosen logits; w[0] is their largest */
      const float top = w[0];
      float sum = 0.f;
      for (int j = 0; j < k; ++j) sum += w[j] = expf(w[j] - top);
      for (int j = 0; j < k; ++j) w[j] /= sum;
    } else if (normalize) {
      float sum = 0.f;
      for (int j = 0; j < k; ++j) sum += w[j];
      for (int j = 0; j < k; ++j) w[j] /= sum;
    }
    if (scaling != 1.f)
      for (int j = 0; j < k; ++j) w[j] *= scaling;
  }
  return 0;
}
