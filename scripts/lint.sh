#!/usr/bin/env bash
# lint.sh - the mechanical checks `make test` runs first: every C file is clang-formatted, and no C file uses
# a function from curl's banned list (use snprintf, memcpy with a length, strtol instead).
set -euo pipefail
cd "$(dirname "$0")/.."

files=$(git ls-files '*.c' '*.h' 2>/dev/null || true)
[ -n "$files" ] || files=$(find src tests -name '*.[ch]')
bad=0
for f in $files; do
    [ -f "$f" ] || continue
    if ! clang-format --dry-run -Werror "$f" >/dev/null 2>&1; then
        echo "lint: $f is not clang-formatted (run: make format)"
        bad=1
    fi
done
if grep -nE '\b(sprintf|vsprintf|strcpy|strcat|strncpy|strtok|atoi|atol|gets)\s*\(' $files; then
    echo "lint: banned functions above (use snprintf, memcpy with a length, strtol)"
    bad=1
fi
[ "$bad" = 0 ] && echo "lint: ok ($(echo "$files" | wc -w) C files)"
exit "$bad"
