/* CPU kernels for hf_oscq's bit-packed weights (the stream layout is in hf_oscq/quantization/packing.py).
 *
 * Codes are read straight from the packed stream as 32-bit words of C codes each (C = 16 at 2 bits, 8 at 3 and 4
 * bits, 4 at 5 to 8 bits): word h holds codes C*h .. C*h + C - 1, code j of it being (word >> (j * bits)) & mask
 * minus the offset max_code(bits). The words of a row segment are copied into a small buffer, then every kernel
 * loops over words with the C codes of a word unrolled, a loop every compiler vectorizes (shift, mask, convert and
 * multiply-add in the SIMD lanes). Products with an input vector x use x permuted the same way ("planes": plane j
 * holds the inputs of code j of every word), so no float copy of the weight is made at batch sizes up to MAX_ROWS.
 *
 * Plain C99 with OpenMP, no intrinsics: the loader compiles it with -march=native where the compiler accepts that
 * (AVX2, AVX-512 or NEON as the building machine has them) and without it otherwise.
 *
 * Scales (float32) follow layout.py, output channel first. For a weight whose output channels are dim 0, code i of
 * the stream has scale[i / block] (block: numel for one scale per tensor, the row length per channel, the group
 * size group-wise). For a 2-D weight stored (in, out) with output channels in dim 1 (GPT-2's Conv1D), code (k, n)
 * has scale_t[(k / block) * out + n]: the scales transposed by the caller, `block` being the rows per input group.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define CHUNK 2048  /* codes decoded at a time (8 kB of floats, within the L1 cache); a multiple of every C */
#define SPARE 8     /* words a buffer holds past the ones loaded: eight-word vector loads may read them */
#define TILE 512    /* output columns a thread accumulates at a time in oscq_matmul_cols; a multiple of every C */
#define MAX_ROWS 16 /* rows of x the fused products take; the caller dequantizes for more */

static inline int64_t codes_per_word(int bits) { return bits == 2 ? 16 : bits <= 4 ? 8 : 4; }

/* Words [first, first + count) of the stream (bits past its end read as zeros). */
static void load_words(const uint8_t *stream, int64_t nbytes, int bits, int64_t first, int64_t count,
                       uint32_t *words) {
    const int64_t word_bits = codes_per_word(bits) * bits;
    /* words whose four bytes lie inside the stream */
    int64_t safe = nbytes >= 4 ? ((nbytes - 4) * 8 / word_bits) + 1 - first : 0;
    safe = safe < 0 ? 0 : safe > count ? count : safe;
    if (word_bits == 32) { /* 2, 4 and 8 bits: the stream is the words (little-endian hosts: the loader checks) */
        memcpy(words, stream + 4 * first, (size_t)(4 * safe));
    } else if (word_bits == 24) { /* 3 and 6 bits: three bytes a word, four words in three 32-bit loads */
        const uint8_t *bytes = stream + 3 * first;
        int64_t h = 0;
        for (; h + 4 <= safe; h += 4) {
            uint32_t a, b, c;
            memcpy(&a, bytes + 3 * h, 4);
            memcpy(&b, bytes + 3 * h + 4, 4);
            memcpy(&c, bytes + 3 * h + 8, 4);
            words[h] = a & 0xFFFFFFu;
            words[h + 1] = (a >> 24) | ((b & 0xFFFFu) << 8);
            words[h + 2] = (b >> 16) | ((c & 0xFFu) << 16);
            words[h + 3] = c >> 8;
        }
        for (; h < safe; h++) memcpy(&words[h], bytes + 3 * h, 4);
    } else { /* 5 and 7 bits: two words fill `bits` bytes; the second starts half a byte in */
        int64_t h = 0;
        if (first % 2 && safe > 0) { /* a second half: then whole pairs */
            h = 1;
            uint32_t word = 0;
            memcpy(&word, stream + ((first * word_bits) >> 3), 4);
            words[0] = word >> 4;
        }
        /* pairs (words first + h, first + h + 1) start at byte (first + h) / 2 * bits; eight bytes must be there */
        const int64_t pairs = nbytes >= 8 ? (nbytes - 8) / bits + 1 : 0, last = 2 * pairs - first;
        const int64_t stop = safe < last ? safe : last;
        const uint8_t *base = stream + (first + h) / 2 * bits;
        const uint32_t low = (1u << word_bits) - 1u;
        for (; h + 1 < stop; h += 2, base += bits) {
            uint64_t pair;
            memcpy(&pair, base, 8);
            words[h] = (uint32_t)pair & low;
            words[h + 1] = (uint32_t)(pair >> word_bits);
        }
        safe = h; /* the rest one by one below */
    }
    for (int64_t h = safe; h < count; h++) { /* the last words of the stream, and any the loops above left */
        const int64_t bit = (first + h) * word_bits, offset = bit >> 3;
        uint32_t word = 0;
        if (offset < nbytes) memcpy(&word, stream + offset, (size_t)(nbytes - offset < 4 ? nbytes - offset : 4));
        words[h] = word >> (bit & 7);
    }
}

/* One code as a float: (word >> shift) & mask, minus the offset max_code(bits). */
#define CODE(word, B, j) ((float)((int32_t)(((word) >> ((B) * (j))) & ((1u << (B)) - 1u)) - ((1 << ((B) - 1)) - 1)))

#if (defined(__GNUC__) || defined(__clang__)) && !defined(OSCQ_PLAIN_C)
/* GCC and Clang vector extensions: eight 32-bit lanes, lowered to whatever SIMD the target has (two 128-bit
 * registers on SSE2 or NEON, one 256-bit register on AVX2 and AVX-512). Other compilers (or -DOSCQ_PLAIN_C) run the
 * plain C loops below, which they may vectorize themselves. */
#define VECTORS 1
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
#if defined(__clang__)
#define SHUFFLE_PAIRS(v) __builtin_shufflevector(v, v, 0, 0, 0, 0, 1, 1, 1, 1)
#else
#define SHUFFLE_PAIRS(v) __builtin_shuffle(v, (v8u){0, 0, 0, 0, 1, 1, 1, 1})
#endif
static inline v8f load8f(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void store8f(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline v8f decode8(v8u word, v8u shift, int bits) {
    const v8i code = (v8i)((word >> shift) & ((1u << bits) - 1u)) - ((1 << (bits - 1)) - 1);
    return __builtin_convertvector(code, v8f);
}
/* The scales of words h .. h + 7, each word's being s[word / per_block]. */
static inline v8f scales8(const float *s, int64_t h, int64_t per_block) {
    if (per_block % 8 == 0) {
        const float value = s[h / per_block];
        return (v8f){value, value, value, value, value, value, value, value};
    }
    if (per_block == 1) return load8f(s + h);
    if (per_block == 2) {
        const float *p = s + h / 2;
        return (v8f){p[0], p[0], p[1], p[1], p[2], p[2], p[3], p[3]};
    }
    if (per_block == 4) {
        const float *p = s + h / 4;
        return (v8f){p[0], p[0], p[0], p[0], p[1], p[1], p[1], p[1]};
    }
    v8f out;
    for (int l = 0; l < 8; l++) out[l] = s[(h + l) / per_block];
    return out;
}
/* Eight consecutive codes starting at code 8 * v of `words` (lanes: word index and shift within the word). */
static inline v8f codes8(const uint32_t *words, int64_t v, int bits) {
    const int c = bits == 2 ? 16 : bits <= 4 ? 8 : 4;
    v8u word, shift;
    if (c == 8) {
        const uint32_t w = words[v];
        word = (v8u){w, w, w, w, w, w, w, w};
        shift = (v8u){0, 1, 2, 3, 4, 5, 6, 7} * (uint32_t)bits;
    } else if (c == 16) {
        const uint32_t w = words[v / 2], base = (uint32_t)(v % 2) * 8;
        word = (v8u){w, w, w, w, w, w, w, w};
        shift = ((v8u){0, 1, 2, 3, 4, 5, 6, 7} + base) * (uint32_t)bits;
    } else { /* two words, each in four lanes: eight words loaded and shuffled (a vector built from scalars would
              * go through memory); `words` holds 6 more words than it is given */
        v8u eight;
        memcpy(&eight, words + 2 * v, sizeof eight);
        word = SHUFFLE_PAIRS(eight);
        shift = (v8u){0, 1, 2, 3, 0, 1, 2, 3} * (uint32_t)bits;
    }
    return decode8(word, shift, bits);
}
#endif

/* Per bit-width B (C codes per word), over `count` words: the codes in their natural order, out[C*h + j]; the
 * product with x in planes, sums[h] = sum_j code(C*h + j) * xp[j * count + h]; and the codes as planes,
 * planes[j * count + h] = code(C*h + j). */
#ifdef VECTORS
#define VECTOR_PART(B, C)                                                                                     \
    static int64_t codes_vector_##B(const uint32_t *words, int64_t count, float *out) {                       \
        const int64_t vectors = count * C / 8;                                                                \
        for (int64_t v = 0; v < vectors; v++) store8f(out + 8 * v, codes8(words, v, B));                      \
        return vectors * 8 / C;                                                                               \
    }                                                                                                         \
    /* codes 8 * v .. 8 * v + 7 times their scale, scale[b] for the next `left` codes, then `block` codes each */ \
    static void scaled_vector_##B(const uint32_t *words, int64_t vectors, const float *scale, int64_t b,         \
                                  int64_t left, int64_t block, float *out) {                                  \
        for (int64_t v = 0; v < vectors; v++, left -= 8) {                                                    \
            if (left == 0) {                                                                                  \
                b++;                                                                                          \
                left = block;                                                                                 \
            }                                                                                                 \
            const float s = scale[b];                                                                         \
            store8f(out + 8 * v, codes8(words, v, B) * (v8f){s, s, s, s, s, s, s, s});                        \
        }                                                                                                     \
    }                                                                                                         \
    static int64_t dot_vector_##B(const uint32_t *words, int64_t count, const float *xp, const float *s,       \
                                  int64_t per_block, float *result) {                                         \
        int64_t h = 0;                                                                                        \
        v8f sum = {0, 0, 0, 0, 0, 0, 0, 0};                                                                   \
        for (; h + 8 <= count; h += 8) {                                                                      \
            v8u word;                                                                                         \
            memcpy(&word, words + h, sizeof word);                                                            \
            v8f total = {0, 0, 0, 0, 0, 0, 0, 0};                                                             \
            for (int j = 0; j < C; j++) {                                                                     \
                const uint32_t shift = (uint32_t)(B * j);                                                     \
                total += decode8(word, (v8u){shift, shift, shift, shift, shift, shift, shift, shift}, B) *    \
                         load8f(xp + j * count + h);                                                          \
            }                                                                                                 \
            sum += scales8(s, h, per_block) * total;                                                          \
        }                                                                                                     \
        *result = 0.0f;                                                                                       \
        for (int l = 0; l < 8; l++) *result += sum[l];                                                        \
        return h;                                                                                             \
    }
#else /* no vector parts: the plain loops below do all the work */
#define VECTOR_PART(B, C)                                                                                     \
    static int64_t codes_vector_##B(const uint32_t *words, int64_t count, float *out) {                       \
        (void)words, (void)count, (void)out;                                                                  \
        return 0;                                                                                             \
    }                                                                                                         \
    static int64_t dot_vector_##B(const uint32_t *words, int64_t count, const float *xp, const float *s,       \
                                  int64_t per_block, float *result) {                                         \
        (void)words, (void)count, (void)xp, (void)s, (void)per_block;                                         \
        *result = 0.0f;                                                                                       \
        return 0;                                                                                             \
    }
#endif
#define DEFINE_KERNELS(B, C)                                                                                  \
    VECTOR_PART(B, C)                                                                                         \
    static void codes_##B(const uint32_t *words, int64_t count, float *out) {                                \
        for (int64_t h = codes_vector_##B(words, count, out); h < count; h++)                                 \
            for (int j = 0; j < C; j++) out[C * h + j] = CODE(words[h], B, j);                                \
    }                                                                                                         \
    static float dot_##B(const uint32_t *words, int64_t count, const float *xp, const float *s,                \
                         int64_t per_block) {                                                                 \
        float result;                                                                                         \
        for (int64_t h = dot_vector_##B(words, count, xp, s, per_block, &result); h < count; h++) {           \
            float total = 0.0f;                                                                               \
            for (int j = 0; j < C; j++) total += CODE(words[h], B, j) * xp[j * count + h];                    \
            result += s[h / per_block] * total;                                                               \
        }                                                                                                     \
        return result;                                                                                        \
    }                                                                                                         \
    static void planes_##B(const uint32_t *words, int64_t count, float *planes) {                            \
        for (int j = 0; j < C; j++)                                                                           \
            for (int64_t h = 0; h < count; h++) planes[j * count + h] = CODE(words[h], B, j);                 \
    }
DEFINE_KERNELS(2, 16)
DEFINE_KERNELS(3, 8)
DEFINE_KERNELS(4, 8)
DEFINE_KERNELS(5, 4)
DEFINE_KERNELS(6, 4)
DEFINE_KERNELS(7, 4)
DEFINE_KERNELS(8, 4)

typedef void (*codes_fn)(const uint32_t *, int64_t, float *);
typedef float (*dot_fn)(const uint32_t *, int64_t, const float *, const float *, int64_t);
static const codes_fn CODES[9] = {0, 0, codes_2, codes_3, codes_4, codes_5, codes_6, codes_7, codes_8};
static const dot_fn DOT[9] = {0, 0, dot_2, dot_3, dot_4, dot_5, dot_6, dot_7, dot_8};
static const codes_fn PLANES[9] = {0, 0, planes_2, planes_3, planes_4, planes_5, planes_6, planes_7, planes_8};
#ifdef VECTORS
typedef void (*scaled_fn)(const uint32_t *, int64_t, const float *, int64_t, int64_t, int64_t, float *);
static const scaled_fn SCALED[9] = {0, 0, scaled_vector_2, scaled_vector_3, scaled_vector_4, scaled_vector_5,
                                    scaled_vector_6, scaled_vector_7, scaled_vector_8};
#endif

static inline void split(int64_t total, int64_t align, int64_t *begin, int64_t *end) {
#ifdef _OPENMP
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
#else
    const int64_t threads = 1, id = 0;
#endif
    int64_t per = (total + threads - 1) / threads;
    per = (per + align - 1) / align * align;
    *begin = id * per < total ? id * per : total;
    *end = *begin + per < total ? *begin + per : total;
}

/* The dequantized weight: out[i] = code(i) * scale in float32, the product layout.expand_scale gives. cols_out == 0:
 * output channels in dim 0, scale[i / block]. cols_out > 0: a 2-D weight (numel / cols_out, cols_out) with output
 * channels in dim 1, scale_t as above. */
int oscq_dequantize(const uint8_t *stream, int64_t nbytes, int bits, int64_t numel, const float *scale, int64_t block,
                    int64_t cols_out, float *out, int threads) {
    if (bits < 2 || bits > 8 || block <= 0) return 1;
    const codes_fn codes_of = CODES[bits];
    const int64_t c = codes_per_word(bits);
#pragma omp parallel num_threads(threads) if (numel > (1 << 16))
    {
        uint32_t words[CHUNK / 4 + SPARE];
        float codes[CHUNK];
        int64_t begin, end;
        split(numel, CHUNK, &begin, &end);
        for (int64_t first = begin; first < end; first += CHUNK) { /* first is a multiple of CHUNK, so of c */
            const int64_t stop = end - first < CHUNK ? end : first + CHUNK, count = (stop - first + c - 1) / c;
            load_words(stream, nbytes, bits, first / c, count, words);
#ifdef VECTORS
            if (cols_out == 0 && block % 8 == 0 && (stop - first) % 8 == 0) { /* eight codes a scale at least */
                SCALED[bits](words, (stop - first) / 8, scale, first / block, block - first % block, block, out + first);
                continue;
            }
#endif
            codes_of(words, count, codes);
            if (cols_out > 0) { /* runs along a row, scaled by the row of scale_t of its input group */
                for (int64_t index = first; index < stop;) {
                    const int64_t row = index / cols_out, col = index - row * cols_out;
                    const float *s = scale + (row / block) * cols_out + col;
                    const int64_t length = cols_out - col < stop - index ? cols_out - col : stop - index;
                    for (int64_t t = 0; t < length; t++) out[index + t] = codes[index - first + t] * s[t];
                    index += length;
                }
            } else { /* runs of one scale */
                int64_t b = first / block, length = block - first % block;
                for (int64_t index = first; index < stop; index += length, length = block, b++) {
                    if (length > stop - index) length = stop - index;
                    const float s = scale[b];
                    for (int64_t t = 0; t < length; t++) out[index + t] = codes[index - first + t] * s;
                }
            }
        }
    }
    return 0;
}

/* Length of the segment of a row starting at `pos` that oscq_matmul_rows decodes at once: whole scale blocks of
 * `span` codes up to CHUNK codes, or a CHUNK-sized piece of one longer block. */
static inline int64_t segment(int64_t pos, int64_t cols, int64_t span) {
    const int64_t left = span <= CHUNK ? cols - pos : span - pos % span;
    const int64_t most = span <= CHUNK ? CHUNK / span * span : CHUNK;
    return left < most ? left : most;
}

/* xp = x (m, cols) with each segment of each row permuted into planes (xp[pos + j * n + h] = x[pos + C * h + j]). */
static void to_planes(const float *x, int64_t m, int64_t cols, int64_t span, int64_t c, float *xp) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t pos = 0, count; pos < cols; pos += count) {
            count = segment(pos, cols, span);
            const int64_t n = count / c;
            const float *row = x + i * cols + pos;
            float *planes = xp + i * cols + pos;
            for (int64_t h = 0; h < n; h++)
                for (int64_t j = 0; j < c; j++) planes[j * n + h] = row[c * h + j];
        }
}

/* sum over the blocks b of `per_block` consecutive sums of s[b] * (sum of the block), with eight partial sums so
 * that the additions vectorize without reordering options. */
static float scaled_sum(const float *sums, int64_t n, int64_t per_block, const float *s) {
    float lanes[8] = {0};
    if (per_block == n) {
        int64_t h = 0;
        for (; h + 8 <= n; h += 8)
            for (int l = 0; l < 8; l++) lanes[l] += sums[h + l];
        float part = 0.0f;
        for (; h < n; h++) part += sums[h];
        for (int l = 0; l < 8; l++) part += lanes[l];
        return s[0] * part;
    }
    float total = 0.0f;
    for (int64_t h0 = 0, b = 0; h0 < n; h0 += per_block, b++) {
        float part = 0.0f;
        for (int64_t h = h0; h < h0 + per_block; h++) part += sums[h];
        total += s[b] * part;
    }
    return total;
}

/* y (m, rows) = x (m, cols) @ W.T (+ bias, unless NULL) for W (rows, cols) with output channels in dim 0 (Linear);
 * code i has scale[i / block]. Needs cols and the codes of a row under one scale to be multiples of the codes per
 * word (rows and scale blocks start on a word) and m <= MAX_ROWS. x is permuted once into planes; each segment of a
 * row is read once: at m = 1 multiplied with x as it is decoded, else decoded into planes for the m rows of x.
 * Per-word sums are added per scale block, then scaled. */
int oscq_matmul_rows(const uint8_t *stream, int64_t nbytes, int bits, int64_t rows, int64_t cols, const float *scale,
                     int64_t block, const float *x, int64_t m, const float *bias, float *y, int threads) {
    const int64_t c = codes_per_word(bits);
    const int64_t span = block < cols ? block : cols; /* codes of a row under one scale */
    if (bits < 2 || bits > 8 || cols % c || block <= 0 || span % c || cols % span || m > MAX_ROWS) return 1;
    const dot_fn dot_of = DOT[bits];
    const codes_fn planes_of = PLANES[bits];
    float *xp = malloc(sizeof(float) * (size_t)(m * cols));
    if (xp == NULL) return 2;
    to_planes(x, m, cols, span, c, xp);
#pragma omp parallel num_threads(threads) if (rows * cols * m > (1 << 15))
    {
        uint32_t words[CHUNK / 4];
        float planes[CHUNK], sums[CHUNK / 4];
        int64_t begin, end;
        split(rows, 1, &begin, &end);
        for (int64_t r = begin; r < end; r++) {
            for (int64_t i = 0; i < m; i++) y[i * rows + r] = 0.0f;
            for (int64_t pos = 0, count; pos < cols; pos += count) {
                count = segment(pos, cols, span);
                const int64_t n = count / c, per_block = (span < count ? span : count) / c;
                load_words(stream, nbytes, bits, (r * cols + pos) / c, n, words);
                if (m > 1) planes_of(words, n, planes);
                const float *s = scale + (r * cols + pos) / block; /* consecutive blocks, consecutive scales */
                for (int64_t i = 0; i < m; i++) {
                    const float *xi = xp + i * cols + pos;
                    if (m == 1) {
                        y[r] += dot_of(words, n, xi, s, per_block);
                    } else {
                        for (int64_t h = 0; h < n; h++) sums[h] = planes[h] * xi[h];
                        for (int64_t j = 1; j < c; j++)
                            for (int64_t h = 0; h < n; h++) sums[h] += planes[j * n + h] * xi[j * n + h];
                        y[i * rows + r] += scaled_sum(sums, n, per_block, s);
                    }
                }
            }
            if (bias != NULL)
                for (int64_t i = 0; i < m; i++) y[i * rows + r] += bias[r];
        }
    }
    free(xp);
    return 0;
}

/* y (m, cols) = x (m, rows) @ W for a 2-D W (rows, cols) with output channels in dim 1 (GPT-2's Conv1D), scale_t
 * as above. Needs cols to be a multiple of the codes per word (rows start on a word) and m <= MAX_ROWS. Threads
 * take tiles of TILE output columns; each row's segment is decoded once for the m rows of x into per-column sums
 * of an input group, which are then scaled column by column. */
int oscq_matmul_cols(const uint8_t *stream, int64_t nbytes, int bits, int64_t rows, int64_t cols,
                     const float *scale_t, int64_t block, const float *x, int64_t m, float *y, int threads) {
    const int64_t c = codes_per_word(bits);
    if (bits < 2 || bits > 8 || block <= 0 || m > MAX_ROWS || cols % c) return 1;
    const codes_fn codes_of = CODES[bits];
    const int64_t tiles = (cols + TILE - 1) / TILE;
#pragma omp parallel num_threads(threads) if (rows * cols * m > (1 << 15))
    {
        uint32_t words[TILE / 4 + SPARE];
        float codes[TILE];
        float acc[MAX_ROWS * TILE];
        int64_t begin, end;
        split(tiles, 1, &begin, &end);
        for (int64_t tile = begin; tile < end; tile++) {
            const int64_t c0 = tile * TILE, width = cols - c0 < TILE ? cols - c0 : TILE;
            for (int64_t i = 0; i < m; i++)
                for (int64_t col = 0; col < width; col++) y[i * cols + c0 + col] = 0.0f;
            for (int64_t g0 = 0; g0 < rows; g0 += block) {
                const int64_t g1 = g0 + block < rows ? g0 + block : rows;
                memset(acc, 0, sizeof(float) * (size_t)(m * TILE));
                for (int64_t k = g0; k < g1; k++) {
                    load_words(stream, nbytes, bits, (k * cols + c0) / c, width / c, words);
                    codes_of(words, width / c, codes);
                    for (int64_t i = 0; i < m; i++) {
                        const float xk = x[i * rows + k];
                        float *a = acc + i * TILE;
                        for (int64_t t = 0; t < width; t++) a[t] += xk * codes[t];
                    }
                }
                const float *s = scale_t + (g0 / block) * cols + c0;
                for (int64_t i = 0; i < m; i++) {
                    float *out = y + i * cols + c0;
                    const float *a = acc + i * TILE;
                    for (int64_t col = 0; col < width; col++) out[col] += s[col] * a[col];
                }
            }
        }
    }
    return 0;
}

/* 1 when none of the first `numel` codes is the all-ones pattern (the one value of `bits` bits no valid code
 * produces: codes are offset to 0 .. 2 * max_code), else 0. */
int oscq_codes_valid(const uint8_t *stream, int64_t nbytes, int bits, int64_t numel, int threads) {
    if (bits < 2 || bits > 8) return 0;
    const int64_t c = codes_per_word(bits), words_total = (numel + c - 1) / c;
    const uint32_t mask = (1u << bits) - 1u;
    int invalid = 0;
#pragma omp parallel num_threads(threads) if (numel > (1 << 18)) reduction(| : invalid)
    {
        uint32_t words[CHUNK / 4];
        int64_t begin, end;
        split(words_total, CHUNK / 4, &begin, &end);
        for (int64_t first = begin; first < end; first += CHUNK / 4) {
            const int64_t count = end - first < CHUNK / 4 ? end - first : CHUNK / 4;
            load_words(stream, nbytes, bits, first, count, words);
            uint32_t found = 0;
            for (int64_t h = 0; h < count; h++) {
                const int64_t left = numel - (first + h) * c; /* codes of this word inside the tensor */
                const int used = left < c ? (int)left : (int)c;
                for (int j = 0; j < used; j++) found |= ((words[h] >> (bits * j)) & mask) == mask;
            }
            invalid |= found != 0;
        }
    }
    return !invalid;
}
