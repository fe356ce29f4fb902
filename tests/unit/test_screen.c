/* Unit tests of the moderation text checks (src/party/screen.c): folding, the word list, whole-word matching
 * with run lengths and swaps, empty answers and echoes of the prompt. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "party/screen.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char LIST[] = "# a test list\n"
                           "ass\n"
                           "  Shit \r\n"
                           "\n"
                           "damn\n"
                           "bo0bs\n" /* a digit in a listed word is a letter of it */
                           "x\n"     /* too short: skipped */
                           "two words\n"
                           "sh!t\n"     /* not letters: skipped */
                           "ＳＨＩＴ\n" /* folds to a duplicate of shit */
                           "fuck\n";

static struct screen_words *list(void)
{
    char err[256];
    size_t skipped;
    struct screen_words *w = screen_words_parse(LIST, strlen(LIST), &skipped, err, sizeof err);
    assert_non_null(w);
    assert_int_equal(skipped, 3);
    assert_int_equal(screen_words_count(w), 5);
    return w;
}

/* The listed words found in text, joined by commas. */
static const char *find(const struct screen_words *w, const char *text)
{
    static char out[256];
    const char *found[8];
    size_t n = screen_find(w, text, strlen(text), found, 8);
    out[0] = '\0';
    size_t o = 0;
    for (size_t i = 0; i < n; i++)
        o += (size_t)snprintf(out + o, sizeof out - o, "%s%s", i ? "," : "", found[i]);
    return out;
}

static const char *fold(const char *in)
{
    static char out[512];
    assert_true(strlen(in) < sizeof out);
    size_t n = screen_fold(in, strlen(in), out);
    assert_int_equal(n, strlen(out));
    assert_true(n <= strlen(in));
    return out;
}

static void test_fold(void **state)
{
    (void)state;
    assert_string_equal(fold("Hello, World!"), "hello, world!");
    assert_string_equal(fold("Ça été ÀÉÎÕÜ ñ"), "ca ete aeiou n");
    assert_string_equal(fold("Straße Æsir Œuvre þorn Ĳssel Łódź"), "strasse aesir oeuvre thorn ijssel lodz");
    assert_string_equal(fold("ｓｈｉｔ！"), "shit!");                              /* fullwidth */
    assert_string_equal(fold("s\xe2\x80\x8bh\xe2\x80\x8di\xef\xbb\xbft"), "shit"); /* ZWSP, ZWJ, BOM */
    assert_string_equal(fold("s\xcc\x81hi\xcc\x88t"), "shit");                     /* combining marks */
    assert_string_equal(fold("\xc2\xad"
                             "a"),
                        "a");                                            /* soft hyphen */
    assert_string_equal(fold("\xf0\x9d\x90\x92\xf0\x9d\x90\xa1"), "sh"); /* math bold S, h */
    assert_string_equal(fold("\xe2\x93\x88\xe2\x93\x97"), "sh");         /* circled s, h */
    assert_string_equal(fold("\xf0\x9f\x87\xb8"), "s");                  /* regional indicator S */
    assert_string_equal(fold("\xd1\x81\xd0\xb0t"), "cat");               /* Cyrillic c, a */
    assert_string_equal(fold("a\xe4\xb8\x96"
                             "b"),
                        "a b"); /* other scripts separate */
    assert_string_equal(fold("a\xff"
                             "b\xc3"),
                        "a b "); /* invalid bytes */
    assert_string_equal(fold("a\tb\x01"), "a b ");
    assert_string_equal(fold(""), "");
}

static void test_words_parse_errors(void **state)
{
    (void)state;
    char err[256];
    assert_null(screen_words_parse("# only comments\n\nx\n", 19, NULL, err, sizeof err));
    assert_non_null(strstr(err, "no usable word"));
    assert_null(screen_words_load("/nonexistent/words.txt", NULL, err, sizeof err));
    assert_non_null(strstr(err, "cannot open"));
    char path[] = "/tmp/test_screen_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "crap\nheck\n", 10), 10);
    close(fd);
    struct screen_words *w = screen_words_load(path, NULL, err, sizeof err);
    unlink(path);
    assert_non_null(w);
    assert_int_equal(screen_words_count(w), 2);
    assert_string_equal(find(w, "what the HECK"), "heck");
    screen_words_free(w);
    /* A list that grows past its first allocation, with every word twice: duplicates are dropped. */
    char big[4096];
    size_t o = 0;
    for (int i = 0; i < 400; i++)
        o += (size_t)snprintf(big + o, sizeof big - o, "w%03d\n", i % 200);
    w = screen_words_parse(big, o, NULL, err, sizeof err);
    assert_non_null(w);
    assert_int_equal(screen_words_count(w), 200);
    assert_string_equal(find(w, "w150 and w7"), "w150");
    screen_words_free(w);
}

static void test_whole_words(void **state)
{
    (void)state;
    struct screen_words *w = list();
    assert_string_equal(find(w, "You are an ass."), "ass");
    assert_string_equal(find(w, "ASS"), "ass");
    assert_string_equal(find(w, "(ass)"), "ass");
    assert_string_equal(find(w, "assassin, class, bass, passive"), "");
    assert_string_equal(find(w, "as"), ""); /* never fewer letters than listed */
    assert_string_equal(find(w, "asss ass"), "ass");
    assert_string_equal(find(w, "a$$hole"), ""); /* part of a longer word */
    assert_string_equal(find(w, "damn! damn? shit, fuck"), "shit,damn,fuck");
    assert_string_equal(find(w, "Nothing to see here."), "");
    assert_string_equal(find(w, ""), "");
    assert_string_equal(find(w, "b00bs bo0bs"), "bo0bs"); /* a listed digit is literal */
    assert_string_equal(find(w, "boobs"), "");
    screen_words_free(w);
}

static void test_obfuscations(void **state)
{
    (void)state;
    struct screen_words *w = list();
    assert_string_equal(find(w, "shiiiiit"), "shit");
    assert_string_equal(find(w, "SSSHHHIIITTT"), "shit");
    assert_string_equal(find(w, "sh1t"), "shit");
    assert_string_equal(find(w, "$h!t"), "shit");
    assert_string_equal(find(w, "5h17"), "shit");
    assert_string_equal(find(w, "sh|t"), "shit");
    assert_string_equal(find(w, "@$$"), "ass");
    assert_string_equal(find(w, "a$5"), "ass");
    assert_string_equal(find(w, "4sS"), "ass");
    assert_string_equal(find(w, "d4mn"), "damn");
    assert_string_equal(find(w, "f*ck"), "fuck");
    assert_string_equal(find(w, "f**k"), "fuck");
    assert_string_equal(find(w, "*uck"), ""); /* a star never stands for the first letter */
    assert_string_equal(find(w, "ｓｈｉｔ"), "shit");
    assert_string_equal(find(w, "s\xe2\x80\x8bh\xe2\x80\x8bi\xe2\x80\x8bt"), "shit");
    assert_string_equal(find(w, "\xc5\x9bh\xc3\xaft"), "shit"); /* ś h ï t */
    assert_string_equal(find(w, "\xd0\xb0ss"), "ass");          /* Cyrillic a */
    assert_string_equal(find(w, "b00bs"), "bo0bs");             /* 0 stands for o */
    assert_string_equal(find(w, "s h i t"), "");                /* spaced letters are not caught, on purpose */
    screen_words_free(w);
}

static void test_find_max_and_order(void **state)
{
    (void)state;
    struct screen_words *w = list();
    const char *found[2];
    const char *text = "fuck damn shit ass";
    size_t n = screen_find(w, text, strlen(text), found, 2);
    assert_int_equal(n, 2);
    assert_string_equal(found[0], "ass"); /* list order */
    assert_string_equal(found[1], "shit");
    assert_int_equal(screen_find(NULL, text, strlen(text), found, 2), 0);
    /* A long run of letters does not make the matcher slow or overflow its window. */
    size_t len = 100000;
    char *big = malloc(len + 1);
    memset(big, 's', len);
    big[len] = '\0';
    assert_string_equal(find(w, big), "");
    memcpy(big, "shit ", 5);
    assert_string_equal(find(w, big), "shit");
    free(big);
    screen_words_free(w);
}

static void test_empty(void **state)
{
    (void)state;
    assert_true(screen_empty("", 0));
    assert_true(screen_empty(" \n\t ", 4));
    assert_true(screen_empty("\xe2\x80\x8b\xc2\xa0\xe3\x80\x80", 8)); /* ZWSP, NBSP, ideographic space */
    assert_false(screen_empty(" . ", 3));
    assert_false(screen_empty("\xe4\xb8\x96", 3)); /* a CJK character is visible */
    assert_false(screen_empty("\xff", 1));
}

static void test_echoes(void **state)
{
    (void)state;
#define ECHO(p, a) screen_echoes(p, strlen(p), a, strlen(a))
    assert_true(ECHO("What is your favorite food?", "what is your favorite food"));
    assert_true(ECHO("What is your favorite food?", "What is your favorite food? What is your favorite food?"));
    assert_true(ECHO("Tell me a joke", "Tell me a joke. Tell me a jo"));
    assert_true(ECHO("Hello", "HELLO!!!"));
    assert_false(ECHO("Hello", "Hello! How can I help?"));
    assert_false(ECHO("What is your favorite food?", "What is your"));
    assert_false(ECHO("What is your favorite food?", "echo: What is your favorite food? [messages=1]"));
    assert_false(ECHO("", "anything"));
    assert_false(ECHO("Hello", ""));
    assert_false(ECHO("\xe4\xb8\x96", "\xe4\xb8\x96")); /* no Latin words to compare */
#undef ECHO
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fold),
        cmocka_unit_test(test_words_parse_errors),
        cmocka_unit_test(test_whole_words),
        cmocka_unit_test(test_obfuscations),
        cmocka_unit_test(test_find_max_and_order),
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_echoes),
    };
    return cmocka_run_group_tests_name("screen", tests, NULL, NULL);
}
