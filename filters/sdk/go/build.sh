#!/usr/bin/env bash
# Builds a Go plugin against the SDK with Debian's Go toolchain and packages, offline:
#   filters/sdk/go/build.sh DIR_WITH_MAIN_GO OUTPUT
# GOPATH mode: the SDK is `nip/nipplugin`; gRPC and protobuf come from /usr/share/gocode
# (golang-google-grpc-dev, golang-google-protobuf-dev; ./dev test installs them).
set -euo pipefail
sdk="$(cd "$(dirname "$0")" && pwd)"
src="$(cd "$1" && pwd)"
out="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
gopath="$(mktemp -d)"
trap 'rm -rf "$gopath"' EXIT
mkdir -p "$gopath/src/nip"
ln -s "$sdk/nipplugin" "$gopath/src/nip/nipplugin"
cd "$src"
GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOCACHE="${GOCACHE:-$HOME/.cache/go-build}" \
  GOFLAGS= go build -o "$out" ./*.go
