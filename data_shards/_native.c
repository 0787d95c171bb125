/* data_shards._native: the shard pipeline's per-character loops, in C.
 *
 * Each function gives bit for bit what its Python/numpy counterpart in filters.py / dedup.py gives (the tests
 * compare them on the test corpus and on random and repetitive texts). They read Python str objects in place (no
 * UTF-32 copy) and write into numpy arrays the caller allocates (any writable C-contiguous buffer), so this
 * file needs only Python.h. The package works without it: setuptools builds it as an optional extension and
 * filters.py / dedup.py fall back to numpy when it is missing (or when MUJINA_NATIVE=0).
 *
 *   class_counts(texts, table, out)                        per-text character class counts
 *   minhash_bins(texts, table, mult, salt, out_min, out_filled, out_len)
 *                                                          MinHash: each (text, bin)'s smallest shingle hash
 *   contains_any(texts, chars) -> [bool]                   normalize()'s test for characters to remove
 *   line_reasons(texts, table, bullets, ...) -> [int]      the duplicate, bullet and ellipsis line tests
 *   char_repetition(texts, table, sizes_top, limits_top, sizes_dup, limits_dup, mult) -> [bool]
 *   word_repetition(texts, word_chars, ...) -> [bool]      Gopher's n-gram repetition test on Japanese
 *                                                          (characters) and English (words) text
 *   index_get / index_place                                dedup._Index's lookups and inserts
 *
 * `table` is filters._CLASSES (uint8 class per code point below its length; code points past it use its
 * last entry, as numpy's np.minimum(cps, size - 1) does). SPACE is class 1 and equals str.isspace() inside
 * the table; no code point past it is a space.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define N_CLASSES 8
#define SPACE 1
#define SHINGLE 5
#define MAX_N 64

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static int get_buf(PyObject *obj, Buf *b, Py_ssize_t itemsize, Py_ssize_t count, int writable, const char *what) {
    b->held = 0;
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    b->held = 1;
    if (b->view.len != itemsize * count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", what, itemsize * count, b->view.len);
        return -1;
    }
    return 0;
}

/* A C-contiguous buffer of uint64 values, at least `min` of them: their number, or -1 with an exception set
 * (b is held either way once the buffer was obtained; release() it). */
static Py_ssize_t get_u64s(PyObject *obj, Buf *b, int writable, Py_ssize_t min, const char *what) {
    b->held = 0;
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    b->held = 1;
    if (b->view.len % 8 || b->view.len / 8 < min) {
        PyErr_Format(PyExc_ValueError, "%s: expected at least %zd uint64 values, got %zd bytes", what, min,
                     b->view.len);
        return -1;
    }
    return b->view.len / 8;
}

static void release(Buf *b) {
    if (b->held) PyBuffer_Release(&b->view);
    b->held = 0;
}

/* The class table as a borrowed view; code points >= size read table[size - 1]. */
typedef struct {
    const uint8_t *cls;
    Py_UCS4 size;
} Table;

static inline uint8_t class_of(const Table *t, Py_UCS4 c) { return t->cls[c < t->size ? c : t->size - 1]; }
static inline int is_space(const Table *t, Py_UCS4 c) { return c < t->size && t->cls[c] == SPACE; }

static int get_table(PyObject *obj, Buf *b, Table *t) {
    b->held = 0;
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_C_CONTIGUOUS) < 0) return -1;
    b->held = 1;
    if (b->view.len < 1 || b->view.len > 0x110000) {
        PyErr_SetString(PyExc_ValueError, "table: expected 1 to 0x110000 uint8 entries");
        return -1;
    }
    t->cls = (const uint8_t *)b->view.buf;
    t->size = (Py_UCS4)b->view.len;
    return 0;
}

static PyObject *as_list(PyObject *texts, const char *what) {
    PyObject *seq = PySequence_Fast(texts, what);
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t d = 0; d < n; d++) {
        if (!PyUnicode_Check(PySequence_Fast_GET_ITEM(seq, d))) {
            PyErr_Format(PyExc_TypeError, "%s: item %zd is not a str", what, d);
            Py_DECREF(seq);
            return NULL;
        }
    }
    return seq;
}

/* A growable uint32 buffer of the current text's units (code points, whitespace removed or collapsed). */
typedef struct {
    uint32_t *p;
    Py_ssize_t cap;
} Units;

static int reserve(Units *u, Py_ssize_t n) {
    if (u->p != NULL && n <= u->cap) return 0;
    Py_ssize_t cap = n > 2 * u->cap ? n : 2 * u->cap;
    cap = cap < 64 ? 64 : cap; /* never a NULL buffer, even for empty texts */
    uint32_t *p = (uint32_t *)realloc(u->p, (size_t)cap * sizeof(uint32_t));
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    u->p = p;
    u->cap = cap;
    return 0;
}

/* Copies s's code points into u (grown as needed); returns their number, or -1 with an exception set. */
static Py_ssize_t load(PyObject *s, Units *u) {
    Py_ssize_t len = PyUnicode_GET_LENGTH(s);
    if (reserve(u, len) < 0) return -1;
    const void *data = PyUnicode_DATA(s);
    switch (PyUnicode_KIND(s)) {
    case PyUnicode_1BYTE_KIND:
        for (Py_ssize_t i = 0; i < len; i++) u->p[i] = ((const Py_UCS1 *)data)[i];
        break;
    case PyUnicode_2BYTE_KIND:
        for (Py_ssize_t i = 0; i < len; i++) u->p[i] = ((const Py_UCS2 *)data)[i];
        break;
    default:
        memcpy(u->p, data, (size_t)len * sizeof(uint32_t));
    }
    return len;
}

static inline uint64_t mix64(uint64_t x) { /* splitmix64's finaliser, as dedup._mix64 */
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* ------------------------------------------------------------------------------------------ class_counts */

static PyObject *class_counts(PyObject *self, PyObject *args) {
    PyObject *texts, *table_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "OOO:class_counts", &texts, &table_obj, &out_obj)) return NULL;
    PyObject *seq = as_list(texts, "class_counts: texts");
    if (seq == NULL) return NULL;
    Py_ssize_t n_docs = PySequence_Fast_GET_SIZE(seq);
    Buf tb, ob;
    Table t;
    Units u = {NULL, 0};
    PyObject *result = NULL;
    ob.held = 0;
    if (get_table(table_obj, &tb, &t) < 0 || get_buf(out_obj, &ob, 8, n_docs * N_CLASSES, 1, "class_counts: out") < 0)
        goto done;
    int64_t *out = (int64_t *)ob.view.buf;
    for (Py_ssize_t d = 0; d < n_docs; d++) {
        Py_ssize_t len = load(PySequence_Fast_GET_ITEM(seq, d), &u);
        if (len < 0) goto done;
        int64_t c[N_CLASSES] = {0};
        for (Py_ssize_t i = 0; i < len; i++) c[class_of(&t, u.p[i])]++;
        memcpy(out + d * N_CLASSES, c, sizeof c);
    }
    result = Py_NewRef(Py_None);
done:
    free(u.p);
    release(&tb);
    release(&ob);
    Py_DECREF(seq);
    return result;
}

/* ------------------------------------------------------------------------------------------ minhash_bins */

/* dedup.Deduplicator.signatures without its densification: each text's whitespace runs collapse to one space
 * and its ends are stripped (" ".join(text.split())); shingle i of the result hashes to
 * mix64(sum_j cp[i+j] * mult[j] ^ salt) and falls in bin ((h >> 32) * K) >> 32; out_min[d, bin] is the
 * bin's smallest hash and out_filled[d, bin] 1 if the bin has any. Texts shorter than SHINGLE after
 * collapsing are left untouched (out_len tells which: the caller hashes them whole). */
static PyObject *minhash_bins(PyObject *self, PyObject *args) {
    PyObject *texts, *table_obj, *mult_obj, *min_obj, *filled_obj, *len_obj;
    unsigned long long salt;
    Py_ssize_t K;
    if (!PyArg_ParseTuple(args, "OOOKnOOO:minhash_bins", &texts, &table_obj, &mult_obj, &salt, &K, &min_obj,
                          &filled_obj, &len_obj))
        return NULL;
    if (K < 1 || K > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "minhash_bins: K must be in [1, 2^20]");
        return NULL;
    }
    PyObject *seq = as_list(texts, "minhash_bins: texts");
    if (seq == NULL) return NULL;
    Py_ssize_t n_docs = PySequence_Fast_GET_SIZE(seq);
    Buf tb, mb, minb, fb, lb;
    Table t;
    Units u = {NULL, 0};
    PyObject *result = NULL;
    mb.held = minb.held = fb.held = lb.held = 0;
    if (get_table(table_obj, &tb, &t) < 0 || get_buf(mult_obj, &mb, 8, SHINGLE, 0, "minhash_bins: mult") < 0 ||
        get_buf(min_obj, &minb, 8, n_docs * K, 1, "minhash_bins: out_min") < 0 ||
        get_buf(filled_obj, &fb, 1, n_docs * K, 1, "minhash_bins: out_filled") < 0 ||
        get_buf(len_obj, &lb, 8, n_docs, 1, "minhash_bins: out_len") < 0)
        goto done;
    const uint64_t *mult = (const uint64_t *)mb.view.buf;
    uint64_t m0 = mult[0], m1 = mult[1], m2 = mult[2], m3 = mult[3], m4 = mult[4];
    for (Py_ssize_t d = 0; d < n_docs; d++) {
        Py_ssize_t len = load(PySequence_Fast_GET_ITEM(seq, d), &u), n = 0;
        if (len < 0) goto done;
        int gap = 0;
        for (Py_ssize_t i = 0; i < len; i++) { /* in place: n <= i */
            uint32_t c = u.p[i];
            if (is_space(&t, c)) {
                gap = n > 0;
                continue;
            }
            if (gap) u.p[n++] = ' ';
            gap = 0;
            u.p[n++] = c;
        }
        ((int64_t *)lb.view.buf)[d] = n;
        if (n < SHINGLE) continue;
        uint64_t *mins = (uint64_t *)minb.view.buf + d * K;
        uint8_t *filled = (uint8_t *)fb.view.buf + d * K;
        for (Py_ssize_t k = 0; k < K; k++) mins[k] = UINT64_MAX;
        memset(filled, 0, (size_t)K);
        const uint32_t *p = u.p;
        for (Py_ssize_t i = 0; i + SHINGLE <= n; i++) {
            uint64_t h = p[i] * m0 + p[i + 1] * m1 + p[i + 2] * m2 + p[i + 3] * m3 + p[i + 4] * m4;
            h = mix64(h ^ (uint64_t)salt);
            uint64_t b = ((h >> 32) * (uint64_t)K) >> 32;
            if (h < mins[b]) mins[b] = h;
            filled[b] = 1;
        }
    }
    result = Py_NewRef(Py_None);
done:
    free(u.p);
    release(&tb);
    release(&mb);
    release(&minb);
    release(&fb);
    release(&lb);
    Py_DECREF(seq);
    return result;
}

/* ------------------------------------------------------------------------------------------- repetition */

/* An open-addressing table of n-gram hash -> (count, characters covered), reused across n and documents. */
typedef struct {
    uint64_t *keys;
    uint32_t *counts;
    int64_t *weights; /* characters one occurrence of the n-gram covers */
    size_t alloc;     /* slots allocated */
    size_t mask;      /* slots in use - 1 (a power of two, at least twice the n-grams) */
    int shift;        /* 64 - log2(slots in use) */
} Counter;

static void counter_free(Counter *c) {
    free(c->keys);
    free(c->counts);
    free(c->weights);
}

/* Empties the table for n n-grams: only as many slots as they need, so a short document after a long one
 * clears a small table. */
static int counter_reset(Counter *c, Py_ssize_t n) {
    size_t cap = 16;
    int bits = 4;
    while (cap < (size_t)n * 2) {
        cap <<= 1;
        bits++;
    }
    if (cap > c->alloc) {
        counter_free(c);
        c->keys = (uint64_t *)malloc(cap * sizeof(uint64_t));
        c->counts = (uint32_t *)malloc(cap * sizeof(uint32_t));
        c->weights = (int64_t *)malloc(cap * sizeof(int64_t));
        c->alloc = cap;
        if (c->keys == NULL || c->counts == NULL || c->weights == NULL) {
            counter_free(c);
            *c = (Counter){NULL, NULL, NULL, 0, 0, 0};
            PyErr_NoMemory();
            return -1;
        }
    }
    c->mask = cap - 1;
    c->shift = 64 - bits;
    memset(c->counts, 0, cap * sizeof(uint32_t));
    return 0;
}

/* The slot of key (a free slot if absent): multiply-shift on the key's top bits. */
static inline size_t counter_slot(const Counter *c, uint64_t key) {
    size_t i = (size_t)((key * 0x9E3779B97F4A7C15ULL) >> c->shift);
    while (c->counts[i] && c->keys[i] != key) i = (i + 1) & c->mask;
    return i;
}

typedef struct {
    Py_ssize_t sizes_top[MAX_N], sizes_dup[MAX_N], n_top, n_dup, max_n, top_max;
    double limits_top[MAX_N], limits_dup[MAX_N], lowest;
    const uint64_t *mult;
    Py_ssize_t n_mult;
} Limits;

/* filters._ngram_repetition(units, weights, sizes_top, sizes_dup, cfg): Gopher's tests with the same n-gram
 * hashes, counts and float comparisons. cum: (len + 1,) prefix sums of the units' weights (characters), or NULL
 * for weights of 1. Returns 1 if the document repeats too much. */
static int repeats(const uint64_t *u, const int64_t *cum, Py_ssize_t len, uint64_t *h, Counter *c,
                   const Limits *lim) {
    double total = cum ? (double)cum[len] : (double)len;
    if (total == 0) return 0;
    int check_dup = 1;
    /* With weights of 1, the most frequent n-gram occurs at least as often as the most frequent larger one
     * (every occurrence of an (n+1)-gram starts with one of its n-gram), so `most` of a smaller n bounds the
     * top test of every larger n: a test the bound passes needs no table. */
    uint32_t bound = UINT32_MAX;
    memset(h, 0, (size_t)len * sizeof(uint64_t));
    for (Py_ssize_t n = 1; n <= lim->max_n; n++) {
        if (n > len) break;
        if (n > lim->top_max && !check_dup) break; /* nothing left that could return 1 */
        Py_ssize_t m = len - n + 1;
        uint64_t f = lim->mult[(n - 1) % lim->n_mult];
        for (Py_ssize_t i = 0; i < m; i++) h[i] += u[i + n - 1] * f;
        double limit_top = -1.0, limit_dup = -1.0;
        for (Py_ssize_t k = 0; k < lim->n_top; k++)
            if (lim->sizes_top[k] == n) limit_top = lim->limits_top[k];
        if (check_dup)
            for (Py_ssize_t k = 0; k < lim->n_dup; k++)
                if (lim->sizes_dup[k] == n) limit_dup = lim->limits_dup[k];
        if (limit_top >= 0 && !cum && bound != UINT32_MAX &&
            (bound < 2 || (double)bound * (double)n / total <= limit_top))
            limit_top = -1.0; /* passes: the exact test below could only agree */
        if (limit_top < 0 && limit_dup < 0) continue;
        if (counter_reset(c, m) < 0) return -1;
        uint32_t most = 0;
        for (Py_ssize_t i = 0; i < m; i++) {
            size_t s = counter_slot(c, h[i]);
            if (c->counts[s]++ == 0) {
                c->keys[s] = h[i];
                c->weights[s] = cum ? cum[i + n] - cum[i] : n;
            }
            if (c->counts[s] > most) most = c->counts[s];
        }
        bound = most;
        if (limit_top >= 0 && most > 1) {
            /* the most frequent n-gram; among equally frequent ones, the one covering the most characters */
            int64_t widest = 0;
            for (size_t s = 0; s <= c->mask; s++)
                if (c->counts[s] == most && c->weights[s] > widest) widest = c->weights[s];
            if ((double)most * (double)widest / total > limit_top) return 1;
        }
        if (limit_dup >= 0) {
            int64_t covered = 0; /* characters of units covered by an n-gram that occurs 2+ times */
            Py_ssize_t reach = 0; /* units [0, reach) are counted */
            if (most > 1) {
                for (Py_ssize_t i = 0; i < m; i++) {
                    if (c->counts[counter_slot(c, h[i])] < 2) continue;
                    Py_ssize_t from = i > reach ? i : reach;
                    if (i + n > from) covered += cum ? cum[i + n] - cum[from] : i + n - from;
                    if (i + n > reach) reach = i + n;
                }
            }
            double fraction = (double)covered / total;
            if (fraction > limit_dup) return 1;
            check_dup = fraction > lim->lowest;
        }
    }
    return 0;
}

static int get_sizes(PyObject *obj, Py_ssize_t *out, Py_ssize_t *n, const char *what) {
    PyObject *seq = PySequence_Fast(obj, what);
    if (seq == NULL) return -1;
    *n = PySequence_Fast_GET_SIZE(seq);
    if (*n > MAX_N) {
        PyErr_Format(PyExc_ValueError, "%s: at most %d sizes", what, MAX_N);
        Py_DECREF(seq);
        return -1;
    }
    for (Py_ssize_t k = 0; k < *n; k++) {
        out[k] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, k));
        if (out[k] == -1 && PyErr_Occurred()) break;
        if (out[k] < 1 || out[k] > MAX_N) {
            PyErr_Format(PyExc_ValueError, "%s: n-gram sizes must be in [1, %d]", what, MAX_N);
            break;
        }
    }
    Py_DECREF(seq);
    return PyErr_Occurred() ? -1 : 0;
}

static int get_limits(PyObject *obj, double *out, Py_ssize_t n, const char *what) {
    PyObject *seq = PySequence_Fast(obj, what);
    if (seq == NULL) return -1;
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_Format(PyExc_ValueError, "%s: one limit per size", what);
        Py_DECREF(seq);
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        out[k] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, k));
        if (out[k] == -1.0 && PyErr_Occurred()) break;
    }
    Py_DECREF(seq);
    return PyErr_Occurred() ? -1 : 0;
}

/* ([texts], table, sizes_top, limits_top, sizes_dup, limits_dup, mult) -> [bool]; words: 0 for characters
 * (the units are the code points other than whitespace: "".join(text.split())), 1 for words (the units are
 * the \w+ runs, table being filters._WORD_CHARS; weights are their lengths). */
static PyObject *repetition(PyObject *args, int words, const char *name) {
    PyObject *texts, *table_obj, *st_obj, *lt_obj, *sd_obj, *ld_obj, *mult_obj;
    if (!PyArg_ParseTuple(args, "OOOOOOO", &texts, &table_obj, &st_obj, &lt_obj, &sd_obj, &ld_obj, &mult_obj))
        return NULL;
    Limits lim;
    if (get_sizes(st_obj, lim.sizes_top, &lim.n_top, "sizes_top") < 0 ||
        get_limits(lt_obj, lim.limits_top, lim.n_top, "limits_top") < 0 ||
        get_sizes(sd_obj, lim.sizes_dup, &lim.n_dup, "sizes_dup") < 0 ||
        get_limits(ld_obj, lim.limits_dup, lim.n_dup, "limits_dup") < 0)
        return NULL;
    if (lim.n_top + lim.n_dup == 0) {
        PyErr_Format(PyExc_ValueError, "%s: no n-gram sizes", name);
        return NULL;
    }
    lim.max_n = lim.top_max = 0;
    lim.lowest = 2.0;
    for (Py_ssize_t k = 0; k < lim.n_top; k++) lim.top_max = lim.sizes_top[k] > lim.top_max ? lim.sizes_top[k] : lim.top_max;
    lim.max_n = lim.top_max;
    for (Py_ssize_t k = 0; k < lim.n_dup; k++) {
        lim.max_n = lim.sizes_dup[k] > lim.max_n ? lim.sizes_dup[k] : lim.max_n;
        lim.lowest = lim.limits_dup[k] < lim.lowest ? lim.limits_dup[k] : lim.lowest;
    }
    PyObject *seq = as_list(texts, name);
    if (seq == NULL) return NULL;
    Py_ssize_t n_docs = PySequence_Fast_GET_SIZE(seq);
    Buf tb, mb;
    Table t;
    Units text = {NULL, 0};
    uint64_t *units = NULL, *h = NULL;
    int64_t *cum = NULL;
    Py_ssize_t cap = 0;
    Counter c = {NULL, NULL, NULL, 0, 0, 0};
    PyObject *result = NULL, *flags = NULL;
    mb.held = 0;
    if (get_table(table_obj, &tb, &t) < 0) goto done;
    lim.n_mult = get_u64s(mult_obj, &mb, 0, 1, "mult");
    if (lim.n_mult < 0) goto done;
    lim.mult = (const uint64_t *)mb.view.buf;
    flags = PyList_New(n_docs);
    if (flags == NULL) goto done;
    for (Py_ssize_t d = 0; d < n_docs; d++) {
        Py_ssize_t len = load(PySequence_Fast_GET_ITEM(seq, d), &text), n = 0;
        if (len < 0) goto done;
        if (len + 1 > cap) {
            free(units);
            free(h);
            free(cum);
            cap = len + 1 > 2 * cap ? len + 1 : 2 * cap;
            units = (uint64_t *)malloc((size_t)cap * sizeof(uint64_t));
            h = (uint64_t *)malloc((size_t)cap * sizeof(uint64_t));
            cum = (int64_t *)malloc((size_t)cap * sizeof(int64_t));
            if (units == NULL || h == NULL || cum == NULL) {
                PyErr_NoMemory();
                goto done;
            }
        }
        if (!words) {
            for (Py_ssize_t i = 0; i < len; i++)
                if (!is_space(&t, text.p[i])) units[n++] = text.p[i];
        } else { /* \w+ runs: str.isalnum() or "_" (the table, and Python's own test past it) */
            cum[0] = 0;
            uint64_t w = 0;
            Py_ssize_t chars = 0;
            for (Py_ssize_t i = 0; i <= len; i++) {
                uint32_t ch = i < len ? text.p[i] : 0;
                int word = i < len && (ch < t.size ? t.cls[ch] != 0 : (ch == '_' || Py_UNICODE_ISALNUM(ch)));
                if (word) {
                    w = mix64(w ^ ((uint64_t)ch + 0x9E3779B97F4A7C15ULL * (uint64_t)(chars + 1)));
                    chars++;
                } else if (chars) {
                    units[n] = mix64(w + (uint64_t)chars);
                    cum[n + 1] = cum[n] + chars;
                    n++;
                    w = 0;
                    chars = 0;
                }
            }
        }
        int r = repeats(units, words ? cum : NULL, n, h, &c, &lim);
        if (r < 0) goto done;
        PyList_SET_ITEM(flags, d, Py_NewRef(r ? Py_True : Py_False));
    }
    result = flags;
    flags = NULL;
done:
    Py_XDECREF(flags);
    free(text.p);
    free(units);
    free(h);
    free(cum);
    counter_free(&c);
    release(&tb);
    release(&mb);
    Py_DECREF(seq);
    return result;
}

static PyObject *char_repetition(PyObject *self, PyObject *args) { return repetition(args, 0, "char_repetition"); }

static PyObject *word_repetition(PyObject *self, PyObject *args) { return repetition(args, 1, "word_repetition"); }

/* ------------------------------------------------------------------------------------------ line_reasons */

/* filters._line_reason for each text: 0 (passes), 1 duplicate_lines, 2 bullet_lines, 3 ellipsis_lines. Lines
 * are split on "\n", stripped of whitespace (str.strip()) and blank ones dropped; a line is a duplicate when an
 * equal line came before (compared character by character, found through a hash table). */
typedef struct {
    Py_ssize_t start, len;
} Line;

static PyObject *line_reasons(PyObject *self, PyObject *args) {
    PyObject *texts, *table_obj, *bullets_obj;
    double max_dup_lines, max_dup_chars, max_bullets, max_ellipses;
    if (!PyArg_ParseTuple(args, "OOUdddd:line_reasons", &texts, &table_obj, &bullets_obj, &max_dup_lines,
                          &max_dup_chars, &max_bullets, &max_ellipses))
        return NULL;
    PyObject *seq = as_list(texts, "line_reasons: texts");
    if (seq == NULL) return NULL;
    Py_ssize_t n_docs = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t n_bullets = PyUnicode_GET_LENGTH(bullets_obj);
    Buf tb;
    Table t;
    Units text = {NULL, 0};
    Line *lines = NULL, *slots = NULL;
    Py_ssize_t lines_cap = 0, slots_cap = 0;
    PyObject *result = NULL, *codes = NULL;
    if (get_table(table_obj, &tb, &t) < 0) goto done;
    codes = PyList_New(n_docs);
    if (codes == NULL) goto done;
    for (Py_ssize_t d = 0; d < n_docs; d++) {
        Py_ssize_t len = load(PySequence_Fast_GET_ITEM(seq, d), &text), n = 0, line_chars = 0;
        if (len < 0) goto done;
        const uint32_t *p = text.p;
        for (Py_ssize_t a = 0; a <= len;) { /* the stripped, non-blank lines */
            Py_ssize_t b = a;
            while (b < len && p[b] != '\n') b++;
            Py_ssize_t x = a, y = b;
            while (x < y && is_space(&t, p[x])) x++;
            while (y > x && is_space(&t, p[y - 1])) y--;
            if (y > x) {
                if (n == lines_cap) {
                    lines_cap = lines_cap ? 2 * lines_cap : 64;
                    Line *grown = (Line *)realloc(lines, (size_t)lines_cap * sizeof(Line));
                    if (grown == NULL) {
                        PyErr_NoMemory();
                        goto done;
                    }
                    lines = grown;
                }
                lines[n++] = (Line){x, y - x};
                line_chars += y - x;
            }
            a = b + 1;
        }
        Py_ssize_t cap = 16;
        while (cap < 2 * n) cap <<= 1;
        if (cap > slots_cap) {
            free(slots);
            slots = (Line *)malloc((size_t)cap * sizeof(Line));
            slots_cap = cap;
            if (slots == NULL) {
                slots_cap = 0;
                PyErr_NoMemory();
                goto done;
            }
        }
        for (Py_ssize_t k = 0; k < cap; k++) slots[k].len = 0;
        Py_ssize_t dup_lines = 0, dup_chars = 0, bulleted = 0, ellipses = 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            const uint32_t *q = p + lines[k].start;
            Py_ssize_t ll = lines[k].len;
            uint64_t hash = (uint64_t)ll;
            for (Py_ssize_t i = 0; i < ll; i++) hash = (hash ^ q[i]) * 0x100000001B3ULL;
            size_t s = (size_t)(mix64(hash) & (uint64_t)(cap - 1));
            int seen = 0;
            while (slots[s].len) {
                if (slots[s].len == ll && memcmp(p + slots[s].start, q, (size_t)ll * sizeof(uint32_t)) == 0) {
                    seen = 1;
                    break;
                }
                s = (s + 1) & (size_t)(cap - 1);
            }
            if (seen) {
                dup_lines++;
                dup_chars += ll;
            } else {
                slots[s] = lines[k];
            }
            for (Py_ssize_t i = 0; i < n_bullets; i++)
                if (q[0] == PyUnicode_READ_CHAR(bullets_obj, i)) {
                    bulleted++;
                    break;
                }
            ellipses += ll >= 3 && q[ll - 1] == '.' && q[ll - 2] == '.' && q[ll - 3] == '.';
        }
        long code = 0;
        if ((double)dup_lines > max_dup_lines * (double)n || (double)dup_chars > max_dup_chars * (double)line_chars)
            code = 1;
        else if (n > 1 && (double)bulleted > max_bullets * (double)n)
            code = 2;
        else if (n > 1 && (double)ellipses > max_ellipses * (double)n)
            code = 3;
        PyObject *v = PyLong_FromLong(code);
        if (v == NULL) goto done;
        PyList_SET_ITEM(codes, d, v);
    }
    result = codes;
    codes = NULL;
done:
    Py_XDECREF(codes);
    free(text.p);
    free(lines);
    free(slots);
    release(&tb);
    Py_DECREF(seq);
    return result;
}

/* ----------------------------------------------------------------------------------------- contains_any */

/* [any(c in chars for c in text) for text in texts]: normalize()'s test for characters it must remove. */
static PyObject *contains_any(PyObject *self, PyObject *args) {
    PyObject *texts, *chars;
    if (!PyArg_ParseTuple(args, "OU:contains_any", &texts, &chars)) return NULL;
    PyObject *seq = as_list(texts, "contains_any: texts");
    if (seq == NULL) return NULL;
    Py_ssize_t n_docs = PySequence_Fast_GET_SIZE(seq), n_chars = PyUnicode_GET_LENGTH(chars);
    uint8_t *bmp = (uint8_t *)calloc(0x10000 / 8, 1); /* the BMP's characters of `chars`, as bits */
    PyObject *flags = NULL;
    if (bmp == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int astral = 0; /* some of `chars` are past the BMP: those are compared one by one */
    for (Py_ssize_t i = 0; i < n_chars; i++) {
        Py_UCS4 c = PyUnicode_READ_CHAR(chars, i);
        if (c < 0x10000)
            bmp[c >> 3] |= (uint8_t)(1u << (c & 7));
        else
            astral = 1;
    }
    flags = PyList_New(n_docs);
    if (flags == NULL) goto done;
    for (Py_ssize_t d = 0; d < n_docs; d++) {
        PyObject *s = PySequence_Fast_GET_ITEM(seq, d);
        Py_ssize_t len = PyUnicode_GET_LENGTH(s);
        int kind = PyUnicode_KIND(s), found = 0;
        const void *data = PyUnicode_DATA(s);
        if (kind == PyUnicode_1BYTE_KIND) {
            const Py_UCS1 *q = (const Py_UCS1 *)data;
            for (Py_ssize_t i = 0; i < len && !found; i++) found = bmp[q[i] >> 3] >> (q[i] & 7) & 1;
        } else if (kind == PyUnicode_2BYTE_KIND) {
            const Py_UCS2 *q = (const Py_UCS2 *)data;
            for (Py_ssize_t i = 0; i < len && !found; i++) found = bmp[q[i] >> 3] >> (q[i] & 7) & 1;
        } else {
            const Py_UCS4 *q = (const Py_UCS4 *)data;
            for (Py_ssize_t i = 0; i < len && !found; i++) {
                Py_UCS4 c = q[i];
                if (c < 0x10000)
                    found = bmp[c >> 3] >> (c & 7) & 1;
                else if (astral)
                    for (Py_ssize_t k = 0; k < n_chars && !found; k++) found = PyUnicode_READ_CHAR(chars, k) == c;
            }
        }
        PyList_SET_ITEM(flags, d, Py_NewRef(found ? Py_True : Py_False));
    }
done:
    free(bmp);
    Py_DECREF(seq);
    return flags;
}

/* -------------------------------------------------------------------------------------------------- index */

/* dedup._Index's two arrays: uint64 keys (0: empty slot; callers use odd keys) and int32 values, a power of
 * two of slots, linear probing from slot (key >> 1) & mask. */
typedef struct {
    Buf kb, vb;
    uint64_t *keys;
    int32_t *vals;
    uint64_t mask;
} Index;

static int get_index(PyObject *keys, PyObject *vals, Index *ix) {
    ix->vb.held = 0;
    Py_ssize_t slots = get_u64s(keys, &ix->kb, 1, 1, "index: keys");
    if (slots < 0) return -1;
    if (slots & (slots - 1)) {
        PyErr_SetString(PyExc_ValueError, "index: keys must be a power of two of uint64 slots");
        return -1;
    }
    if (get_buf(vals, &ix->vb, 4, slots, 1, "index: vals") < 0) return -1;
    ix->keys = (uint64_t *)ix->kb.view.buf;
    ix->vals = (int32_t *)ix->vb.view.buf;
    ix->mask = (uint64_t)slots - 1;
    return 0;
}

/* index_get(keys, vals, queries, out): out[i] = the value stored for queries[i], or -1 (_Index.get_many). */
static PyObject *index_get(PyObject *self, PyObject *args) {
    PyObject *keys, *vals, *q_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "OOOO:index_get", &keys, &vals, &q_obj, &out_obj)) return NULL;
    Index ix;
    Buf qb, ob;
    qb.held = ob.held = 0;
    PyObject *result = NULL;
    if (get_index(keys, vals, &ix) < 0) goto done;
    Py_ssize_t n = get_u64s(q_obj, &qb, 0, 0, "index_get: queries");
    if (n < 0 || get_buf(out_obj, &ob, 4, n, 1, "index_get: out") < 0) goto done;
    const uint64_t *q = (const uint64_t *)qb.view.buf;
    int32_t *out = (int32_t *)ob.view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t s = (q[i] >> 1) & ix.mask;
        out[i] = -1;
        while (ix.keys[s]) {
            if (ix.keys[s] == q[i]) {
                out[i] = ix.vals[s];
                break;
            }
            s = (s + 1) & ix.mask;
        }
    }
    result = Py_NewRef(Py_None);
done:
    release(&ix.kb);
    release(&ix.vb);
    release(&qb);
    release(&ob);
    return result;
}

/* index_place(keys, vals, new_keys, new_vals): stores distinct keys that are not in the table yet, in order
 * (_Index._place). The caller keeps the table at most half full. */
static PyObject *index_place(PyObject *self, PyObject *args) {
    PyObject *keys, *vals, *k_obj, *v_obj;
    if (!PyArg_ParseTuple(args, "OOOO:index_place", &keys, &vals, &k_obj, &v_obj)) return NULL;
    Index ix;
    Buf kb, vb;
    kb.held = vb.held = 0;
    PyObject *result = NULL;
    if (get_index(keys, vals, &ix) < 0) goto done;
    Py_ssize_t n = get_u64s(k_obj, &kb, 0, 0, "index_place: new_keys");
    if (n < 0 || get_buf(v_obj, &vb, 4, n, 0, "index_place: new_vals") < 0) goto done;
    if ((uint64_t)n > ix.mask) {
        PyErr_SetString(PyExc_ValueError, "index_place: too many keys for the table");
        goto done;
    }
    const uint64_t *k = (const uint64_t *)kb.view.buf;
    const int32_t *v = (const int32_t *)vb.view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (k[i] == 0) {
            PyErr_SetString(PyExc_ValueError, "index_place: key 0 marks an empty slot");
            goto done;
        }
        uint64_t s = (k[i] >> 1) & ix.mask;
        while (ix.keys[s]) s = (s + 1) & ix.mask;
        ix.keys[s] = k[i];
        ix.vals[s] = v[i];
    }
    result = Py_NewRef(Py_None);
done:
    release(&ix.kb);
    release(&ix.vb);
    release(&kb);
    release(&vb);
    return result;
}

static PyMethodDef methods[] = {
    {"class_counts", class_counts, METH_VARARGS,
     "class_counts(texts, table, out): out[d, k] = characters of texts[d] in class k (out: (D, 8) int64)."},
    {"minhash_bins", minhash_bins, METH_VARARGS,
     "minhash_bins(texts, table, mult, salt, K, out_min, out_filled, out_len): each (text, bin)'s smallest "
     "shingle hash of the whitespace-collapsed texts (see dedup.Deduplicator.signatures)."},
    {"char_repetition", char_repetition, METH_VARARGS,
     "char_repetition(texts, classes, sizes_top, limits_top, sizes_dup, limits_dup, mult) -> [bool]: "
     "filters._ngram_repetition on each text's code points other than whitespace (Japanese)."},
    {"word_repetition", word_repetition, METH_VARARGS,
     "word_repetition(texts, word_chars, sizes_top, limits_top, sizes_dup, limits_dup, mult) -> [bool]: "
     "filters._ngram_repetition on each text's \\w+ words, weighted by their length (English; texts lower-cased)."},
    {"line_reasons", line_reasons, METH_VARARGS,
     "line_reasons(texts, classes, bullets, max_dup_lines, max_dup_chars, max_bullets, max_ellipses) -> [int]: "
     "filters._line_reason of each text as 0 (passes), 1 duplicate_lines, 2 bullet_lines, 3 ellipsis_lines."},
    {"contains_any", contains_any, METH_VARARGS,
     "contains_any(texts, chars) -> [bool]: whether each text contains any of the characters of `chars`."},
    {"index_get", index_get, METH_VARARGS,
     "index_get(keys, vals, queries, out): dedup._Index.get_many into out (int32, -1 where absent)."},
    {"index_place", index_place, METH_VARARGS,
     "index_place(keys, vals, new_keys, new_vals): dedup._Index._place, in order."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "The shard pipeline's per-character loops in C (see _native.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
