#!/usr/bin/env bash
# check-docs.sh - the README's configuration table must be exactly what `asyncllm config` prints, so that the
# docs cannot drift from the code's table of settings (src/core/config.c). Fix with: make docs
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build/asyncllm}
table=$("$bin" config)
if ! grep -qF -- "$table" README.md; then
    echo "check-docs: README.md's configuration table differs from '$bin config' (run: make docs)"
    diff <(echo "$table") <(sed -n '/^| flag | environment variable/,/^$/p' README.md | sed '$d') || true
    exit 1
fi
echo "check-docs: README configuration table is up to date"
