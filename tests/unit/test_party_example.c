/* Compiles examples/party_min.c, the minimal party of docs/PARTIES.md, so that it keeps building against the
 * engine's current API, and tests its pure part. `test_party_example run [settings]` runs the example itself
 * (the end-to-end tests do, against the real broker). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

int party_min_main(int argc, char **argv);
#define main party_min_main
#include "../../examples/party_min.c"
#undef main

#include <string.h>

static void test_describe(void **state)
{
    (void)state;
    char out[256];
    const char *msg =
        "{\"conversation_id\": \"abc\", \"turn\": 2, \"status\": \"complete\", \"llm_response\": \"Pizza.\"}";
    assert_int_equal(party_min_describe(msg, strlen(msg), out, sizeof out), 0);
    assert_string_equal(out, "abc turn 2 complete: 6 bytes of answer");
    assert_int_equal(party_min_describe("not json", 8, out, sizeof out), -1);
    assert_int_equal(party_min_describe("{\"turn\": 1}", 11, out, sizeof out), -1);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "run") == 0)
        return party_min_main(argc - 1, argv + 1);
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_describe)};
    return cmocka_run_group_tests_name("party_example", tests, NULL, NULL);
}
