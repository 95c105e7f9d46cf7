#!/usr/bin/env bash
# Installs the benchmark tools a fresh machine lacks, builds release binaries and runs
# bench/bench.py, which writes bench/RESULTS.md (~10 minutes with RUNS=3), then
# bench/policy.py (JWT and rate limits), bench/mtls.py (mutual TLS between two proxies), bench/sidecar.py (two sidecars),
# bench/xds-scale, which adds the
# control-plane section to it (~1 minute), and
# bench/multi-region, which adds the multi-region routing section (~6 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
command -v taskset >/dev/null || missing+=(util-linux)
command -v redis-benchmark >/dev/null || missing+=(redis-tools)
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables-legacy >/dev/null || missing+=(iptables)
if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=(); [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
    # Debian starts the packaged services; the benchmark runs its own.
    pkill -x nginx 2>/dev/null || true
    pkill -x haproxy 2>/dev/null || true
    pkill -x redis-server 2>/dev/null || true
fi
command -v oha >/dev/null || cargo install --locked oha
rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
cargo build --release -p nip -p nip-bench-baseline -p nip-bench-xds -p nip-bench-regions
cargo build --release --target wasm32-wasip1 --manifest-path filters/examples/Cargo.toml
python3 bench/bench.py "$@"
# The cost of a JWT check and of rate limits beside nginx's limit_req (~5 minutes).
python3 bench/policy.py
# The Rust SDK's empty on_message beside the raw no-op plugin (~2 minutes).
python3 bench/plugin_sdk.py
# Request tracing at 1 % and 100 % beside none, spans to an OTLP receiver (~2 minutes).
python3 bench/tracing.py
# A new Rust plugin: nip init to the first response under nip dev, save to serving (~2 minutes).
python3 bench/first_plugin.py
# Normal requests next to 2,000 idle and 300 slowloris connections (~3 minutes).
python3 bench/crowd.py
# Mutual TLS between two proxies, NIP → NIP beside nginx → nginx (~2 minutes).
python3 bench/mtls.py
# Two sidecars against a direct path and nginx, HTTP and TCP, in network namespaces
# (~3 minutes; needs root).
python3 bench/sidecar.py
# The control plane at scale: apply → ACK over 100 proxies, memory at 1k/10k streams.
ulimit -n 65536 2>/dev/null || true
target/release/nip-bench-xds target/release/nip bench/RESULTS.md
# Three regions behind userspace WAN links: latency vs round_robin vs static priority.
target/release/nip-bench-regions target/release/nip bench/RESULTS.md
