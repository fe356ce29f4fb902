#!/usr/bin/env python3
"""Rewrites the configuration table in README.md from `asyncllm config` (see scripts/check-docs.sh)."""
import subprocess
import sys

binary = sys.argv[1] if len(sys.argv) > 1 else "build/asyncllm"
table = subprocess.run([binary, "config"], capture_output=True, text=True, check=True).stdout
readme = open("README.md").read()
start = readme.index("| flag | environment variable |")
end = readme.index("\n\n", start) + 1
open("README.md", "w").write(readme[:start] + table + readme[end:])
