/* screen.h - the pure text checks of `asyncllm moderate`: a word list matched after Unicode folding and
 * de-obfuscation, empty answers, and answers that only repeat the prompt. No I/O except screen_words_load(),
 * no allocation behind the caller's back except the word list itself; unit-tested in tests/unit/test_screen.c.
 *
 * Folding (screen_fold) turns UTF-8 into lower-case ASCII so that one comparison catches the common disguises:
 * Latin letters with accents lose them (é → e, ß → ss, Æ → ae), fullwidth forms become ASCII (ｓｈｉｔ), the
 * "styled" letters of Unicode's mathematical, circled, squared and regional-indicator blocks become plain
 * letters, the Cyrillic letters that look Latin become Latin (а → a), and zero-width characters, bidi controls,
 * variation selectors and combining marks are dropped (so "s\u200Bhit" and "s\u0301hit" are "shit"). Any other
 * character becomes a space: it separates words.
 *
 * Matching (screen_find) is by whole word on the folded text. A character of the text stands for a letter of a
 * listed word when it is that letter, or a usual swap for it (0 o, 1 i l, 2 z, 3 e, 4 a, 5 s, 6 g b, 7 t, 8 b,
 * 9 g, @ a, $ s, ! i, | i l, + t, and * for any letter but the first). Repeated letters are matched by run
 * length: each run of a letter in the listed word may be longer in the text, never shorter, so the listed "ass"
 * catches "aaasss" and "a$$" but not "as". Words are delimited by anything but letters, digits, @ and $ (so a
 * trailing "!" ends a word: "damn!" is "damn", while "sh!t" is one word). Not caught on purpose: letters spaced
 * apart ("s h i t"), which would flag ordinary text. */
#ifndef ASYNCLLM_SCREEN_H
#define ASYNCLLM_SCREEN_H

#include <stdbool.h>
#include <stddef.h>

/* Limits of a word list (STYLE.md rule 6): file size, number of words, bytes of one folded word. */
#define SCREEN_MAX_FILE (8u << 20)
#define SCREEN_MAX_WORDS 100000
#define SCREEN_MAX_WORD 64

struct screen_words;

/* Parses a word list: one word per line, UTF-8, folded like the text; blank lines and lines starting with '#'
 * are skipped, as are words of less than two letters or with a space inside (a warning counts them in
 * *skipped, which may be NULL). Returns a list the caller frees with screen_words_free(), or NULL with a
 * message in err when the text has no usable word or passes a limit. */
struct screen_words *screen_words_parse(const char *text, size_t len, size_t *skipped, char *err, size_t errlen);
/* Reads and parses the file at path (at most SCREEN_MAX_FILE bytes). */
struct screen_words *screen_words_load(const char *path, size_t *skipped, char *err, size_t errlen);
void screen_words_free(struct screen_words *w);
size_t screen_words_count(const struct screen_words *w);

/* Folds in[0..len) into out, which must have room for len + 1 bytes (the folded text is never longer than
 * its source). Returns the folded length; out is NUL-terminated. Invalid UTF-8 bytes become spaces. */
size_t screen_fold(const char *in, size_t len, char *out);

/* The listed words found in text (UTF-8): each at most once, in list order, up to max of them. found[i]
 * points to the word as the list spells it (folded), owned by w. Returns how many were written. */
size_t screen_find(const struct screen_words *w, const char *text, size_t len, const char **found, size_t max);

/* True if text has nothing visible: only whitespace, zero-width characters and combining marks. */
bool screen_empty(const char *text, size_t len);

/* True if the answer only repeats the prompt: its words (letters and digits, folded) are the prompt's words,
 * once or several times over (a last repetition may be cut short). Punctuation and spacing are ignored. */
bool screen_echoes(const char *prompt, size_t plen, const char *answer, size_t alen);

#endif
