#!/usr/bin/env python3
"""The cost of Plugin SDK v2: CPU per request of a plugin written on the Rust SDK with an
empty on_message (every request still becomes a message, its parts read only when asked
for, and a handler future) beside the raw proxy-wasm no-op plugin.

Same bed as bench/bench.py (one proxy worker pinned to CPU 1, wrk and the nginx backend on
CPU 0, 50 keep-alive connections), interleaved over RUNS rounds. Target: the SDK adds at
most 1 µs or 10 % per request over the raw plugin.

Out of process: the same no-op handler on the Python and Go SDKs, run by the proxy as an
ext_proc plugin, beside nginx calling an equivalent service in the same language with
auth_request; CPU of the proxy and its plugin process (nginx, its worker and the service).

Appends its section to bench/RESULTS.md (replacing an older one). Environment: RUNS (3),
DURATION (10).
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared bed)

OUT = bench.OUT
RUNS = bench.RUNS
DURATION = bench.DURATION


def nip_conf(name: str, wasm: str | None) -> Path:
    plugins, route_plugins = "", ""
    if wasm:
        plugins = f'plugins:\n  p: {{ source: {{ file: "{bench.PLUGINS / wasm}" }} }}\n'
        route_plugins = "    plugins: [p]\n"
    return bench.write(OUT / f"sdk-{name}.yaml", f"""
admin: {{ address: "{bench.ADMIN}" }}
api_gateway: {{ address: "{bench.LISTEN}" }}
services:
  backend: {{ endpoints: ["{bench.BACKEND}"] }}
{plugins}routes:
  - name: all
    service: backend
{route_plugins}""")


def nip(name: str, wasm: str | None):
    return lambda: [str(bench.ROOT / "target/release/nip"), "proxy", "--config",
                    str(nip_conf(name, wasm)), "--threads", "1"]


VENV_PYTHON = bench.ROOT / "target/interop-venv/bin/python"
GO_NOOP = OUT / "go-noop"
GO_AUTH = OUT / "go-auth-service"
PLUGIN_PORT = 18930
AUTH_PORT = 18931


def process_conf(name: str, command: list[str], env: dict[str, str]) -> Path:
    command_yaml = ", ".join(f'"{c}"' for c in command)
    env_yaml = ", ".join(f'{k}: "{v}"' for k, v in env.items())
    return bench.write(OUT / f"sdk-{name}.yaml", f"""
admin: {{ address: "{bench.ADMIN}" }}
api_gateway: {{ address: "{bench.LISTEN}" }}
services:
  backend: {{ endpoints: ["{bench.BACKEND}"] }}
  plugin: {{ endpoints: ["127.0.0.1:{PLUGIN_PORT}"], protocol: http2 }}
plugins:
  p:
    isolation: process
    process: {{ service: plugin, timeout: 2s, command: [{command_yaml}], env: {{ {env_yaml} }} }}
routes:
  - name: all
    service: backend
    plugins: [p]
""")


def nip_process(name: str, command: list[str], env: dict[str, str]):
    return lambda: [str(bench.ROOT / "target/release/nip"), "proxy", "--config",
                    str(process_conf(name, command, env)), "--threads", "1"]


def nginx_auth_conf() -> Path:
    return bench.write(OUT / "auth-nginx.conf", f"""
worker_processes 1;
daemon off;
error_log {OUT}/auth-nginx-error.log;
pid {OUT}/auth-nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream backend {{ server {bench.BACKEND}; keepalive 128; }}
  upstream auth {{ server 127.0.0.1:{AUTH_PORT}; keepalive 32; }}
  server {{
    listen {bench.LISTEN} backlog=4096;
    location / {{
      auth_request /_auth;
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
    location = /_auth {{
      internal;
      proxy_pass http://auth/check;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
    }}
  }}
}}
""")


def nginx_with(service: list[str]):
    """nginx and its auth service under one shell that ends both (so both are measured,
    and no service outlives its round)."""
    quoted = " ".join(f"'{a}'" for a in service)
    script = (f"{quoted} {AUTH_PORT} & svc=$!; nginx -c {nginx_auth_conf()} & ng=$!; "
              "trap 'kill $svc $ng 2>/dev/null' TERM INT EXIT; wait")
    return lambda: ["sh", "-c", script]


def descendants(pid: int) -> list[int]:
    """A process and all of its descendants (nginx's worker under the shell, a plugin
    process under the proxy)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        out = subprocess.run(["pgrep", "-P", str(current)], capture_output=True, text=True)
        todo += [int(p) for p in out.stdout.split()]
    return found


SDK_PYTHON = {"PYTHONPATH": str(bench.ROOT / "filters/sdk/python")}

PROXIES = {
    "nip": nip("plain", None),
    "nip+raw-noop": nip("raw-noop", "noop.wasm"),
    "nip+sdk-noop": nip("sdk-noop", "sdk_noop.wasm"),
    "nip+python-process": nip_process(
        "python-process",
        [str(VENV_PYTHON), str(bench.ROOT / "filters/examples/python-noop/noop.py")],
        SDK_PYTHON),
    "nginx+python-auth_request": nginx_with(
        [str(VENV_PYTHON), str(bench.ROOT / "bench/auth-service/auth.py")]),
    "nip+go-process": nip_process("go-process", [str(GO_NOOP)], {}),
    "nginx+go-auth_request": nginx_with([str(GO_AUTH)]),
}


def build_process_plugins() -> None:
    """The Go no-op plugin and auth service (Debian's Go; ./dev test installs it)."""
    subprocess.run([str(bench.ROOT / "filters/sdk/go/build.sh"),
                    str(bench.ROOT / "filters/examples/go-noop"), str(GO_NOOP)], check=True)
    subprocess.run(["go", "build", "-o", str(GO_AUTH), "main.go"],
                   cwd=bench.ROOT / "bench/auth-service", check=True,
                   env={**__import__("os").environ, "GO111MODULE": "off"})
    if not VENV_PYTHON.exists():
        sys.exit("bench: run ./dev test once first (it makes target/interop-venv with grpcio)")


def measure(name: str) -> dict:
    bench.PROXIES[name] = PROXIES[name]
    with bench.running(name, f"sdk-{name}") as (pids, _):
        pids = descendants(pids[0])
        before = bench.cpu_ticks(pids)
        rps, total, errors = bench.run_wrk()
        after = bench.cpu_ticks(pids)
    if errors:
        raise RuntimeError(f"{name}: {errors} non-2xx responses")
    return {"rps": rps, "cpu_us": (after - before) * 1_000_000 / bench.CLK_TCK / max(total, 1)}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    build_process_plugins()
    backend = subprocess.Popen(bench.taskset(bench.LOAD_CPU,
                                             ["nginx", "-c", str(bench.nginx_backend_conf())]))
    try:
        if not bench.wait_for_200(f"http://{bench.BACKEND}/"):
            sys.exit("bench: the nginx backend did not start")
        results = bench.interleave(list(PROXIES), measure)
    finally:
        backend.terminate()
        backend.wait()
    (OUT / "plugin-sdk-raw.json").write_text(json.dumps(results, indent=2))
    write_results(results)


def write_results(results: dict[str, list[dict]]) -> None:
    med = {name: {k: statistics.median(r[k] for r in rows) for k in ("rps", "cpu_us")}
           for name, rows in results.items()}
    lines = ["| proxy | max req/s | CPU µs/req | over plain NIP µs/req |", "|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['rps']:,.0f} | {m['cpu_us']:.2f} | "
                     f"{m['cpu_us'] - med['nip']['cpu_us']:+.2f} |")
    process_lines = ["| plugin out of process | NIP + plugin, CPU µs/req | nginx auth_request + service, CPU µs/req | NIP ÷ nginx |",
                     "|---|---|---|---|"]
    for lang in ("python", "go"):
        ours = med[f"nip+{lang}-process"]["cpu_us"]
        theirs = med[f"nginx+{lang}-auth_request"]["cpu_us"]
        process_lines.append(f"| {lang} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
    raw, sdk = med["nip+raw-noop"]["cpu_us"], med["nip+sdk-noop"]["cpu_us"]
    added, share = sdk - raw, (sdk - raw) / raw * 100
    met = "met" if added <= 1.0 or share <= 10.0 else "NOT met"
    section = "\n".join([
        "<!-- plugin-sdk: generated by bench/plugin_sdk.py -->",
        f"## Plugin SDK v2: medians of {RUNS} interleaved runs ({time.strftime('%Y-%m-%d')})",
        "",
        "The bed of the first table (one proxy worker on CPU 1, wrk -t1 -c50 and the backend "
        f"on CPU 0, {DURATION} s per phase). `sdk-noop` is a Rust SDK plugin with an empty "
        "`on_message` (each request becomes a message whose parts are read from the proxy "
        "only when asked for, and a handler future); `raw-noop` the proxy-wasm plugin that "
        "does nothing. This machine's timings were noisy (plain NIP 38–58 µs/req across "
        "rounds): the medians carry that.",
        "",
        *lines,
        "",
        f"The SDK adds {added:+.2f} µs ({share:+.1f} %) per request over the raw plugin: "
        f"target (+1 µs or +10 %) {met}.",
        "",
        "Out of process: a no-op plugin on the Python or Go SDK, asked over ext_proc for "
        "every request (the proxy runs it: its CPU counts), beside nginx asking an "
        "equivalent service (200, nothing else) in the same language with auth_request "
        "(nginx, its worker and the service counted).",
        "",
        *process_lines,
        "<!-- /plugin-sdk -->",
    ])
    bench.put_section("plugin-sdk", section)


if __name__ == "__main__":
    main()
