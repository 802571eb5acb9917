#!/bin/sh
# Fails when a built module exports any dynamic symbol besides luaopen_*.
set -eu
for so in "$@"; do
  extra=$(nm -D --defined-only "$so" | awk '{print $3}' | grep -v '^luaopen_' | grep -v '^_' || true)
  if [ -n "$extra" ]; then echo "$so exports more than luaopen_*: $extra" >&2; exit 1; fi
done
