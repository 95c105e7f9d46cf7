#!/bin/sh
# Builds the C example plugin with Debian's clang and wasi-libc: ./build.sh OUT.wasm
set -eu
here=$(dirname "$0")
out=${1:-"$here/c_deny.wasm"}
exec clang --target=wasm32-wasi --sysroot=/usr -O2 -mexec-model=reactor \
    -Wall -Wextra -Werror -o "$out" "$here/plugin.c"
