#!/usr/bin/env bash
# Regenerates nipplugin/ext_proc.pb: the descriptors of Envoy's ext_proc service and
# everything it imports, from the .proto files the envoy-types crate ships (the same ones
# nip-xds compiles). The Go SDK reads messages through these descriptors (dynamicpb), so
# no generated Go code is needed. Needs protoc (Debian's protobuf-compiler).
set -euo pipefail
cd "$(dirname "$0")"
proto=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/envoy-types-0.7.*/proto | tail -1)
protoc -I "$proto/data-plane-api" -I "$proto/xds" -I "$proto/protoc-gen-validate" \
  -I "$proto/googleapis" -I "$proto/cel-spec/proto" -I "$proto/opentelemetry-proto" \
  -I "$proto/client_model" --include_imports --descriptor_set_out=nipplugin/ext_proc.pb \
  envoy/service/ext_proc/v3/external_processor.proto
