/* read_bandwidth.c - streaming read bandwidth of this machine with N threads: the ceiling for
 * decode, which reads every weight once per token.
 *
 *   cc -O2 -march=native -pthread bench/read_bandwidth.c -o read_bandwidth
 *   ./read_bandwidth [threads [MiB]]       prints GB/s (median of 7 passes) on one line
 *
 * Each thread ORs its share of a buffer far larger than any last-level cache into four
 * independent vector accumulators, so the loop waits on memory, not on arithmetic. The buffer is
 * on 2 MiB pages where Linux lends them, as the runtime's weights are (runtime/src/cpu/huge_pages.h):
 * from 4 KiB pages a Zen 4 core read 20-22 GB/s, from huge pages 27-29.
 * bench/compare_llamacpp.py compiles and runs it. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512i vec;
#define VZERO() _mm512_setzero_si512()
#define VLOAD(p) _mm512_load_si512((const void *) (p))
#define VOR(a, b) _mm512_or_si512(a, b)
#elif defined(__AVX2__)
#include <immintrin.h>
typedef __m256i vec;
#define VZERO() _mm256_setzero_si256()
#define VLOAD(p) _mm256_load_si256((const __m256i *) (p))
#define VOR(a, b) _mm256_or_si256(a, b)
#else
typedef uint64_t vec;
#define VZERO() 0
#define VLOAD(p) (*(const uint64_t *) (p))
#define VOR(a, b) ((a) | (b))
#endif

struct share {
    const uint8_t * p;
    size_t n;
    vec out;
};

static void * read_share(void * arg) {
    struct share * s = (struct share *) arg;
    vec a = VZERO(), b = VZERO(), c = VZERO(), d = VZERO();
    const size_t w = sizeof(vec);
    for (size_t i = 0; i + 4 * w <= s->n; i += 4 * w) {
        a = VOR(a, VLOAD(s->p + i));
        b = VOR(b, VLOAD(s->p + i + w));
        c = VOR(c, VLOAD(s->p + i + 2 * w));
        d = VOR(d, VLOAD(s->p + i + 3 * w));
    }
    s->out = VOR(VOR(a, b), VOR(c, d));
    return NULL;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return x < y ? -1 : x > y;
}

int main(int argc, char ** argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 1;
    const size_t bytes = (size_t) (argc > 2 ? atoi(argv[2]) : 1024) << 20;
    if (threads < 1 || threads > 256 || bytes == 0) {
        fprintf(stderr, "usage: read_bandwidth [threads [MiB]]\n");
        return 2;
    }
    const size_t huge = (size_t) 2 << 20, rounded = (bytes + huge - 1) / huge * huge;
    uint8_t * buf = (uint8_t *) aligned_alloc(huge, rounded);
    if (!buf) return 1;
#if defined(MADV_HUGEPAGE)
    madvise(buf, rounded, MADV_HUGEPAGE);
#endif
    memset(buf, 1, bytes);
    const size_t per = bytes / threads / 256 * 256;
    enum { kPasses = 7 };
    double gbs[kPasses];
    for (int pass = 0; pass < kPasses; pass++) {
        pthread_t th[256];
        struct share s[256];
        const double t0 = now();
        for (int i = 0; i < threads; i++) {
            s[i].p = buf + per * i;
            s[i].n = per;
            pthread_create(&th[i], NULL, read_share, &s[i]);
        }
        for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
        gbs[pass] = (double) per * threads / (now() - t0) / 1e9;
        volatile uint8_t sink = ((const uint8_t *) &s[0].out)[0];
        (void) sink;
    }
    qsort(gbs, kPasses, sizeof gbs[0], cmp);
    printf("%.2f\n", gbs[kPasses / 2]);
    free(buf);
    return 0;
}
