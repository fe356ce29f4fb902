/* screen.c - see screen.h.
 *
 * Cost. Folding is one pass. Matching looks at each word start of the folded text and, for the one or two
 * letters its first character may stand for, at the listed words starting with that letter (the list is
 * bucketed by first character). One comparison is a small dynamic program over the listed word's runs of
 * letters: the set of text positions that the runs matched so far can end at, which stays tiny because only
 * "1", "|", "6" and "*" are ambiguous. A word spanning more than MATCH_SPAN characters of text is not matched,
 * which bounds the work per start. */
#include "party/screen.h"

#include "core/map.h"
#include "core/util.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MATCH_SPAN 256

/* ---------------------------------------------------------------- folding */

/* U+00C0..U+00FF. "" for the two signs (multiplication, division), which separate words. */
static const char *const latin1[64] = {
    "a", "a", "a", "a", "a", "a", "ae", "c", "e", "e", "e", "e", "i", "i", "i",  "i",  /* C0 */
    "d", "n", "o", "o", "o", "o", "o",  "",  "o", "u", "u", "u", "u", "y", "th", "ss", /* D0 */
    "a", "a", "a", "a", "a", "a", "ae", "c", "e", "e", "e", "e", "i", "i", "i",  "i",  /* E0 */
    "d", "n", "o", "o", "o", "o", "o",  "",  "o", "u", "u", "u", "u", "y", "th", "y",  /* F0 */
};

/* U+0100..U+017F, one letter each; '2' marks the ligatures IJ ij (ij) and OE oe (oe). */
static const char latin_ext_a[] = "aaaaaa"
                                  "cccccccc"
                                  "dddd"
                                  "eeeeeeeeee"
                                  "gggggggg"
                                  "hhhh"
                                  "iiiiiiiiii"
                                  "22"
                                  "jj"
                                  "kkk"
                                  "llllllllll"
                                  "nnnnnnn"
                                  "nn"
                                  "oooooo"
                                  "22"
                                  "rrrrrr"
                                  "ssssssss"
                                  "tttttt"
                                  "uuuuuuuuuuuu"
                                  "ww"
                                  "yyy"
                                  "zzzzzz"
                                  "s";
_Static_assert(sizeof latin_ext_a == 0x80 + 1, "one letter per code point of U+0100..U+017F");

/* Greek and Cyrillic letters that look like Latin ones, and the euro sign (a usual "e"). Sorted. */
static const struct {
    uint32_t cp;
    char c;
} lookalikes[] = {
    {0x391, 'a'}, {0x392, 'b'}, {0x395, 'e'}, {0x396, 'z'}, {0x397, 'h'}, {0x399, 'i'},  {0x39A, 'k'}, {0x39C, 'm'},
    {0x39D, 'n'}, {0x39F, 'o'}, {0x3A1, 'p'}, {0x3A4, 't'}, {0x3A5, 'y'}, {0x3A7, 'x'},  {0x3B1, 'a'}, {0x3B9, 'i'},
    {0x3BA, 'k'}, {0x3BD, 'v'}, {0x3BF, 'o'}, {0x3C1, 'p'}, {0x3C4, 't'}, {0x3C5, 'u'},  {0x401, 'e'}, {0x405, 's'},
    {0x406, 'i'}, {0x408, 'j'}, {0x410, 'a'}, {0x412, 'b'}, {0x415, 'e'}, {0x41A, 'k'},  {0x41C, 'm'}, {0x41D, 'h'},
    {0x41E, 'o'}, {0x420, 'p'}, {0x421, 'c'}, {0x422, 't'}, {0x423, 'y'}, {0x425, 'x'},  {0x430, 'a'}, {0x435, 'e'},
    {0x43A, 'k'}, {0x43E, 'o'}, {0x440, 'p'}, {0x441, 'c'}, {0x443, 'y'}, {0x445, 'x'},  {0x451, 'e'}, {0x455, 's'},
    {0x456, 'i'}, {0x458, 'j'}, {0x4BB, 'h'}, {0x4CF, 'l'}, {0x501, 'd'}, {0x20AC, 'e'},
};

/* Characters that are invisible or only modify their neighbour: zero-width spaces and joiners, bidi controls,
 * fillers, variation selectors, tags, and combining marks. Sorted, inclusive ranges. */
static const uint32_t dropped[][2] = {
    {0x00AD, 0x00AD}, {0x0300, 0x036F},   {0x0483, 0x0489},   {0x061C, 0x061C}, {0x115F, 0x1160}, {0x17B4, 0x17B5},
    {0x180B, 0x180F}, {0x1AB0, 0x1AFF},   {0x1DC0, 0x1DFF},   {0x200B, 0x200F}, {0x202A, 0x202E}, {0x2060, 0x2064},
    {0x2066, 0x206F}, {0x20D0, 0x20FF},   {0x3164, 0x3164},   {0xFE00, 0xFE0F}, {0xFE20, 0xFE2F}, {0xFEFF, 0xFEFF},
    {0xFFA0, 0xFFA0}, {0x1D173, 0x1D17A}, {0xE0000, 0xE0FFF},
};

static bool is_dropped(uint32_t cp)
{
    size_t lo = 0, hi = sizeof dropped / sizeof dropped[0];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < dropped[mid][0])
            hi = mid;
        else if (cp > dropped[mid][1])
            lo = mid + 1;
        else
            return true;
    }
    return false;
}

static char lookalike(uint32_t cp)
{
    size_t lo = 0, hi = sizeof lookalikes / sizeof lookalikes[0];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < lookalikes[mid].cp)
            hi = mid;
        else if (cp > lookalikes[mid].cp)
            lo = mid + 1;
        else
            return lookalikes[mid].c;
    }
    return 0;
}

/* Decodes one UTF-8 sequence at s (len > 0 bytes left). Returns the code point and its length in *n, or
 * UINT32_MAX with *n = 1 for a malformed byte. */
static uint32_t decode(const unsigned char *s, size_t len, size_t *n)
{
    unsigned char c = s[0];
    *n = 1;
    if (c < 0x80)
        return c;
    size_t k;
    uint32_t cp, min;
    if (c >= 0xC2 && c <= 0xDF) {
        k = 1;
        cp = c & 0x1F;
        min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        k = 2;
        cp = c & 0x0F;
        min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        k = 3;
        cp = c & 0x07;
        min = 0x10000;
    } else {
        return UINT32_MAX;
    }
    if (len <= k)
        return UINT32_MAX;
    for (size_t i = 1; i <= k; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return UINT32_MAX;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return UINT32_MAX;
    *n = k + 1;
    return cp;
}

/* Writes the folding of cp into o (at most 2 bytes, never more than cp's UTF-8 length); returns how many. */
static size_t fold_cp(uint32_t cp, char *o)
{
    if (cp >= 0xFF01 && cp <= 0xFF5E) /* fullwidth ASCII */
        cp -= 0xFEE0;
    if (cp < 0x80) {
        if (cp >= 'A' && cp <= 'Z')
            o[0] = (char)(cp - 'A' + 'a');
        else if (cp < 0x20 || cp == 0x7F)
            o[0] = ' ';
        else
            o[0] = (char)cp;
        return 1;
    }
    if (is_dropped(cp))
        return 0;
    const char *s = NULL;
    char one[2] = {0, 0};
    if (cp >= 0xC0 && cp <= 0xFF) {
        s = latin1[cp - 0xC0];
    } else if (cp >= 0x100 && cp <= 0x17F) {
        one[0] = latin_ext_a[cp - 0x100];
        s = one[0] != '2' ? one : cp < 0x140 ? "ij" : "oe";
    } else if (cp >= 0x1D400 && cp <= 0x1D6A3) { /* mathematical bold, italic, script, fraktur... letters */
        uint32_t i = (cp - 0x1D400) % 52;
        one[0] = (char)('a' + (i < 26 ? i : i - 26));
        s = one;
    } else if (cp >= 0x1D7CE && cp <= 0x1D7FF) { /* mathematical digits */
        one[0] = (char)('0' + (cp - 0x1D7CE) % 10);
        s = one;
    } else if (cp >= 0x24B6 && cp <= 0x24E9) { /* circled letters */
        one[0] = (char)('a' + (cp - 0x24B6) % 26);
        s = one;
    } else if (cp >= 0x249C && cp <= 0x24B5) { /* parenthesized letters */
        one[0] = (char)('a' + (cp - 0x249C));
        s = one;
    } else if (cp >= 0x1F130 && cp <= 0x1F189 && (cp - 0x1F130) % 32 < 26) { /* squared, negative circled */
        one[0] = (char)('a' + (cp - 0x1F130) % 32);
        s = one;
    } else if (cp >= 0x1F1E6 && cp <= 0x1F1FF) { /* regional indicators */
        one[0] = (char)('a' + (cp - 0x1F1E6));
        s = one;
    } else if ((one[0] = lookalike(cp)) != 0) {
        s = one;
    }
    if (!s || !s[0]) {
        o[0] = ' ';
        return 1;
    }
    size_t n = strlen(s);
    memcpy(o, s, n);
    return n;
}

size_t screen_fold(const char *in, size_t len, char *out)
{
    const unsigned char *s = (const unsigned char *)in;
    size_t i = 0, o = 0;
    while (i < len) {
        size_t n;
        uint32_t cp = decode(s + i, len - i, &n);
        if (cp == UINT32_MAX)
            out[o++] = ' ';
        else
            o += fold_cp(cp, out + o);
        i += n;
    }
    out[o] = '\0';
    return o;
}

/* ---------------------------------------------------------------- characters of folded text */

static bool is_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

/* Characters that continue a word: a neighbouring match is not a whole word. */
static bool strong(char c)
{
    return is_alnum(c) || c == '@' || c == '$';
}

/* The letters a character of the text may stand for, besides itself. */
static const char *swaps(char c)
{
    switch (c) {
    case '0':
        return "o";
    case '1':
        return "il";
    case '2':
        return "z";
    case '3':
        return "e";
    case '4':
        return "a";
    case '5':
        return "s";
    case '6':
        return "gb";
    case '7':
        return "t";
    case '8':
        return "b";
    case '9':
        return "g";
    case '@':
        return "a";
    case '$':
        return "s";
    case '!':
        return "i";
    case '|':
        return "il";
    case '+':
        return "t";
    default:
        return "";
    }
}

static bool can_be(char t, char letter, bool first)
{
    if (t == letter)
        return true;
    if (t == '*')
        return !first;
    return t && strchr(swaps(t), letter) != NULL;
}

/* ---------------------------------------------------------------- word list */

struct word {
    char text[SCREEN_MAX_WORD + 1]; /* folded */
    char letter[SCREEN_MAX_WORD];   /* runs of letters: "ass" is a x1, s x2 */
    unsigned char count[SCREEN_MAX_WORD];
    int nruns;
};

struct screen_words {
    struct word **w; /* each allocated once: the dedup map keys into them while the array grows */
    size_t n;
    size_t *bucket[128]; /* indexes of the words starting with that character, in list order */
    size_t nbucket[128];
};

void screen_words_free(struct screen_words *sw)
{
    if (!sw)
        return;
    for (int i = 0; i < 128; i++)
        free(sw->bucket[i]);
    for (size_t i = 0; i < sw->n; i++)
        free(sw->w[i]);
    free(sw->w);
    free(sw);
}

size_t screen_words_count(const struct screen_words *sw)
{
    return sw ? sw->n : 0;
}

/* Adds the folded word f[0..n) ([a-z0-9], 2 to SCREEN_MAX_WORD bytes) unless seen already. */
static void add_word(struct screen_words *sw, size_t *cap, struct map *seen, const char *f, size_t n)
{
    if (map_get(seen, f))
        return;
    if (sw->n == *cap) {
        *cap = *cap ? *cap * 2 : 64;
        sw->w = xrealloc(sw->w, *cap * sizeof *sw->w);
    }
    struct word *w = xcalloc(1, sizeof *w);
    sw->w[sw->n++] = w;
    memcpy(w->text, f, n);
    w->text[n] = '\0';
    for (const char *p = w->text; *p; p++) {
        if (w->nruns && w->letter[w->nruns - 1] == *p)
            w->count[w->nruns - 1]++;
        else {
            w->letter[w->nruns] = *p;
            w->count[w->nruns++] = 1;
        }
    }
    map_put(seen, w->text, w);
}

struct screen_words *screen_words_parse(const char *text, size_t len, size_t *skipped, char *err, size_t errlen)
{
    if (skipped)
        *skipped = 0;
    if (len > SCREEN_MAX_FILE) {
        snprintf(err, errlen, "word list larger than %u bytes", SCREEN_MAX_FILE);
        return NULL;
    }
    struct screen_words *sw = xcalloc(1, sizeof *sw);
    struct map *seen = map_new();
    size_t cap = 0;
    char line[4 * SCREEN_MAX_WORD + 1], folded[sizeof line];
    for (size_t i = 0; i < len;) {
        const char *nl = memchr(text + i, '\n', len - i);
        size_t end = nl ? (size_t)(nl - text) : len;
        const char *s = text + i;
        size_t n = end - i;
        i = end + 1;
        while (n && (*s == ' ' || *s == '\t' || *s == '\r'))
            s++, n--;
        while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r'))
            n--;
        if (n == 0 || s[0] == '#')
            continue;
        bool ok = n < sizeof line;
        size_t fl = 0;
        if (ok) {
            memcpy(line, s, n);
            fl = screen_fold(line, n, folded);
            for (size_t k = 0; k < fl && ok; k++)
                ok = is_alnum(folded[k]);
        }
        if (!ok || fl < 2 || fl > SCREEN_MAX_WORD) {
            if (skipped)
                (*skipped)++;
            continue;
        }
        if (sw->n == SCREEN_MAX_WORDS) {
            snprintf(err, errlen, "more than %d words in the list", SCREEN_MAX_WORDS);
            map_free(seen);
            screen_words_free(sw);
            return NULL;
        }
        add_word(sw, &cap, seen, folded, fl);
    }
    map_free(seen);
    if (sw->n == 0) {
        snprintf(err, errlen, "no usable word in the list (one word per line, at least two letters or digits)");
        screen_words_free(sw);
        return NULL;
    }
    for (size_t k = 0; k < sw->n; k++)
        sw->nbucket[(unsigned char)sw->w[k]->text[0]]++;
    for (int c = 0; c < 128; c++) {
        if (sw->nbucket[c])
            sw->bucket[c] = xcalloc(sw->nbucket[c], sizeof *sw->bucket[c]);
        sw->nbucket[c] = 0;
    }
    for (size_t k = 0; k < sw->n; k++) {
        unsigned char c = (unsigned char)sw->w[k]->text[0];
        sw->bucket[c][sw->nbucket[c]++] = k;
    }
    return sw;
}

struct screen_words *screen_words_load(const char *path, size_t *skipped, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    struct buf b;
    buf_init(&b, SCREEN_MAX_FILE);
    char chunk[65536];
    size_t n;
    int rc = 0;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0 && rc == 0)
        rc = buf_append(&b, chunk, n);
    bool failed = ferror(f);
    fclose(f);
    struct screen_words *sw = NULL;
    if (rc)
        snprintf(err, errlen, "%s is larger than %u bytes", path, SCREEN_MAX_FILE);
    else if (failed)
        snprintf(err, errlen, "cannot read %s", path);
    else
        sw = screen_words_parse(b.data ? b.data : "", b.len, skipped, err, errlen);
    buf_free(&b);
    return sw;
}

/* ---------------------------------------------------------------- matching */

/* True if the listed word w matches the folded text t[s..n) as a whole word starting at s. */
static bool match_at(const struct word *w, const char *t, size_t n, size_t s)
{
    size_t span = n - s < MATCH_SPAN ? n - s : MATCH_SPAN;
    unsigned char reach[MATCH_SPAN + 1], next[MATCH_SPAN + 1];
    memset(reach, 0, span + 1);
    reach[0] = 1;
    size_t lo = 0, hi = 0;
    for (int r = 0; r < w->nruns; r++) {
        memset(next, 0, span + 1);
        size_t nlo = SIZE_MAX, nhi = 0;
        for (size_t p = lo; p <= hi; p++) {
            if (!reach[p])
                continue;
            size_t q = p, c = 0;
            while (q < span && can_be(t[s + q], w->letter[r], r == 0)) {
                q++;
                if (++c >= w->count[r]) {
                    next[q] = 1;
                    nlo = q < nlo ? q : nlo;
                    nhi = q > nhi ? q : nhi;
                }
            }
        }
        if (nlo == SIZE_MAX)
            return false;
        memcpy(reach, next, span + 1);
        lo = nlo;
        hi = nhi;
    }
    for (size_t p = lo; p <= hi; p++)
        if (reach[p] && (s + p == n || !strong(t[s + p])))
            return true;
    return false;
}

size_t screen_find(const struct screen_words *sw, const char *text, size_t len, const char **found, size_t max)
{
    if (!sw || max == 0)
        return 0;
    char *t = xmalloc(len + 1);
    size_t n = screen_fold(text, len, t);
    unsigned char *hit = xcalloc(sw->n, 1);
    size_t nhit = 0;
    for (size_t s = 0; s < n && nhit < sw->n; s++) {
        char c = t[s];
        if (!(strong(c) || c == '!' || c == '|' || c == '+') || (s > 0 && strong(t[s - 1])))
            continue;
        /* the first letters this character may stand for: itself and its swaps */
        char firsts[4] = {0};
        size_t nf = 0;
        if (is_alnum(c))
            firsts[nf++] = c;
        for (const char *p = swaps(c); *p && nf < 3; p++)
            firsts[nf++] = *p;
        for (size_t f = 0; f < nf; f++) {
            unsigned char b = (unsigned char)firsts[f];
            for (size_t k = 0; k < sw->nbucket[b]; k++) {
                size_t wi = sw->bucket[b][k];
                if (!hit[wi] && match_at(sw->w[wi], t, n, s)) {
                    hit[wi] = 1;
                    nhit++;
                }
            }
        }
    }
    size_t out = 0;
    for (size_t k = 0; k < sw->n && out < max; k++)
        if (hit[k])
            found[out++] = sw->w[k]->text;
    free(hit);
    free(t);
    return out;
}

/* ---------------------------------------------------------------- other checks */

static bool is_space(uint32_t cp)
{
    return cp == ' ' || (cp >= 0x09 && cp <= 0x0D) || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
           cp == 0x3000;
}

bool screen_empty(const char *text, size_t len)
{
    const unsigned char *s = (const unsigned char *)text;
    for (size_t i = 0; i < len;) {
        size_t n;
        uint32_t cp = decode(s + i, len - i, &n);
        if (cp == UINT32_MAX || (!is_space(cp) && !is_dropped(cp)))
            return false;
        i += n;
    }
    return true;
}

/* Splits folded text into its words of letters and digits: starts and lengths, up to max of them. */
static size_t words_of(const char *t, size_t n, size_t *start, size_t *wlen, size_t max)
{
    size_t k = 0;
    for (size_t i = 0; i < n && k < max;) {
        while (i < n && !is_alnum(t[i]))
            i++;
        size_t b = i;
        while (i < n && is_alnum(t[i]))
            i++;
        if (i > b) {
            start[k] = b;
            wlen[k++] = i - b;
        }
    }
    return k;
}

bool screen_echoes(const char *prompt, size_t plen, const char *answer, size_t alen)
{
    /* An echo has about as many words as the prompt, times the repetitions: cap the work at 4096 words. */
    enum { MAXW = 4096 };
    char *p = xmalloc(plen + 1), *a = xmalloc(alen + 1);
    size_t pn = screen_fold(prompt, plen, p), an = screen_fold(answer, alen, a);
    size_t *ps = xmalloc(MAXW * sizeof *ps), *pl = xmalloc(MAXW * sizeof *pl);
    size_t *as = xmalloc(MAXW * sizeof *as), *al = xmalloc(MAXW * sizeof *al);
    size_t np = words_of(p, pn, ps, pl, MAXW), na = words_of(a, an, as, al, MAXW);
    bool echo = np > 0 && na >= np && na < MAXW && np < MAXW;
    for (size_t i = 0; echo && i < na; i++) {
        size_t j = i % np;
        bool last_cut = i == na - 1 && i >= np && al[i] < pl[j]; /* a last repetition cut short */
        echo = last_cut ? memcmp(a + as[i], p + ps[j], al[i]) == 0
                        : al[i] == pl[j] && memcmp(a + as[i], p + ps[j], al[i]) == 0;
    }
    free(p);
    free(a);
    free(ps);
    free(pl);
    free(as);
    free(al);
    return echo;
}
