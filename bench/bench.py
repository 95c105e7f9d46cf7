#!/usr/bin/env python3
"""Side-by-side proxy benchmark: nip, nginx, HAProxy and a bare pingora proxy.

Every proxy runs ONE worker pinned to CPU 1, in front of the same backend (nginx
`return 200`, one worker); the load generators and the backend share CPU 0. For each
proxy, interleaved over RUNS rounds, it measures:

* max requests/s, closed loop: `wrk -t1 -c50`
* CPU microseconds per request: delta of utime+stime of the proxy's processes
  (/proc/PID/stat) divided by the requests wrk completed
* p50/p99/p99.9 at a fixed rate, open loop: `oha -q RATE -c 50 --latency-correction`
* idle RSS after start-up and peak RSS (VmHWM) after the load
* start-up time: from exec to the first proxied 200

and writes medians, with ratios to nginx and HAProxy, to bench/RESULTS.md.
Environment: RUNS (3), DURATION seconds per load phase (10), RATE for the open loop (10000).
"""

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
RUNS = int(os.environ.get("RUNS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))
RATE = int(os.environ.get("RATE", "10000"))
CONNECTIONS = 50
BACKEND = "127.0.0.1:18000"
LISTEN = "127.0.0.1:18001"
ADMIN = "127.0.0.1:18901"
PROXY_CPU = "1"
LOAD_CPU = "0"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def nginx_backend_conf(out: Path = OUT, backend: str = BACKEND) -> Path:
    """nginx answering `200 ok` on `backend`, its files in `out` (bench/mtls.py uses it too)."""
    return write(out / "backend-nginx.conf", f"""
worker_processes 1;
daemon off;
error_log {out}/backend-error.log;
pid {out}/backend.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen {backend} backlog=4096;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
""")


PLUGINS = ROOT / "filters/examples/target/wasm32-wasip1/release"


def nip_conf(plugin: str | None = None) -> Path:
    plugins, route_plugins = "", ""
    if plugin == "noop":
        plugins = f'plugins:\n  noop: {{ source: {{ file: "{PLUGINS / "noop.wasm"}" }} }}\n'
        route_plugins = "    plugins: [noop]\n"
    elif plugin == "header":
        plugins = (f'plugins:\n  header: {{ source: {{ file: "{PLUGINS / "add_header.wasm"}" }}, '
                   f'config: "x-bench=1" }}\n')
        route_plugins = "    plugins: [header]\n"
    name = f"nip-{plugin}.yaml" if plugin else "nip.yaml"
    return write(OUT / name, f"""
admin: {{ address: "{ADMIN}" }}
api_gateway: {{ address: "{LISTEN}" }}
services:
  backend: {{ endpoints: ["{BACKEND}"] }}
{plugins}routes:
  - name: all
    service: backend
{route_plugins}""")


def nginx_proxy_conf() -> Path:
    return write(OUT / "proxy-nginx.conf", f"""
worker_processes 1;
daemon off;
error_log {OUT}/proxy-nginx-error.log;
pid {OUT}/proxy-nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream backend {{ server {BACKEND}; keepalive 128; }}
  server {{
    listen {LISTEN} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")


def haproxy_conf() -> Path:
    return write(OUT / "haproxy.cfg", f"""
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind {LISTEN}
  default_backend b
backend b
  server s1 {BACKEND}
""")


PROXIES = {
    "nip": lambda: [str(ROOT / "target/release/nip"), "proxy", "--config", str(nip_conf()),
                    "--threads", "1"],
    "nginx": lambda: ["nginx", "-c", str(nginx_proxy_conf())],
    "haproxy": lambda: ["haproxy", "-db", "-f", str(haproxy_conf())],
    "pingora": lambda: [str(ROOT / "target/release/nip-bench-baseline"), LISTEN, BACKEND],
    "nip+noop-plugin": lambda: [str(ROOT / "target/release/nip"), "proxy", "--config",
                                str(nip_conf("noop")), "--threads", "1"],
    "nip+header-plugin": lambda: [str(ROOT / "target/release/nip"), "proxy", "--config",
                                  str(nip_conf("header")), "--threads", "1"],
}


def pids_of(root_pid: int) -> list[int]:
    """The process and its children (nginx master + worker)."""
    pids = [root_pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(root_pid)], capture_output=True, text=True)
        pids += [int(p) for p in out.stdout.split()]
    except OSError:
        pass
    return pids


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError):
            pass
    return total


def rss_kb(pids: list[int], key: str) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def wait_for_200(url: str, deadline_s: float = 10.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.002)
    return False


def taskset(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu] + argv


def run_wrk(headers: tuple[str, ...] = ()) -> tuple[float, int, int]:
    """Closed-loop load: requests/s, requests completed, and how many were not 2xx/3xx."""
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}s"]
    for header in headers:
        argv += ["-H", header]
    out = subprocess.run(taskset(LOAD_CPU, argv + [f"http://{LISTEN}/"]),
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"    wrk saw {errors.group(1)} non-2xx responses", file=sys.stderr)
    return rps, total, int(errors.group(1)) if errors else 0


def run_oha() -> dict:
    out = subprocess.run(
        taskset(LOAD_CPU, ["oha", "-z", f"{DURATION}s", "-q", str(RATE), "-c", str(CONNECTIONS),
                           "--latency-correction", "--no-tui", "--output-format", "json",
                           f"http://{LISTEN}/"]),
        capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    p = data["latencyPercentiles"]
    return {"p50_ms": p["p50"] * 1000, "p99_ms": p["p99"] * 1000, "p999_ms": p["p99.9"] * 1000,
            "success": data["summary"]["successRate"]}


@contextlib.contextmanager
def running(name: str, log_name: str):
    """Starts proxy `name` pinned to PROXY_CPU, waits for its first proxied 200 and yields
    (its pids, start-up ms); stops it (SIGTERM, then SIGKILL after 10 s) afterwards."""
    log = open(OUT / f"{log_name}.log", "w")
    start = time.monotonic()
    proc = subprocess.Popen(taskset(PROXY_CPU, PROXIES[name]()), stdout=log, stderr=log)
    try:
        if not wait_for_200(f"http://{LISTEN}/"):
            raise RuntimeError(f"{name} did not serve a 200; see {OUT}/{log_name}.log")
        startup_ms = (time.monotonic() - start) * 1000
        time.sleep(0.5)
        yield pids_of(proc.pid), startup_ms
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        time.sleep(0.3)


def measure(name: str) -> dict:
    with running(name, name) as (pids, startup_ms):
        idle_rss = rss_kb(pids, "VmRSS")
        before = cpu_ticks(pids)
        rps, total, _ = run_wrk()
        after = cpu_ticks(pids)
        cpu_us = (after - before) * 1_000_000 / CLK_TCK / max(total, 1)
        latency = run_oha()
        peak_rss = rss_kb(pids, "VmHWM")
        return {"rps": rps, "cpu_us": cpu_us, "startup_ms": startup_ms,
                "idle_rss_mb": idle_rss / 1024, "peak_rss_mb": peak_rss / 1024, **latency}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for tool in ["nginx", "haproxy", "wrk", "oha", "taskset"]:
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is missing (bench/run.sh installs it)")
    backend = subprocess.Popen(taskset(LOAD_CPU, ["nginx", "-c", str(nginx_backend_conf())]))
    try:
        if not wait_for_200(f"http://{BACKEND}/"):
            sys.exit("bench: the nginx backend did not start")
        results = interleave(list(PROXIES), measure)
    finally:
        backend.terminate()
        backend.wait()
    (OUT / "raw.json").write_text(json.dumps(results, indent=2))
    write_results(results)


def interleave(names: list[str], measure) -> dict[str, list[dict]]:
    """RUNS rounds, each measuring every name once in turn, so that the machine's drift
    falls on all of them alike; each name's results in round order."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    for run in range(RUNS):
        for name in names:
            print(f"run {run + 1}/{RUNS}: {name}", file=sys.stderr)
            results[name].append(measure(name))
            print(f"    {results[name][-1]}", file=sys.stderr)
    return results


def put_section(tag: str, section: str) -> None:
    """Puts a script's section (between `<!-- TAG: generated …` and `<!-- /TAG -->`) into
    bench/RESULTS.md in place of its older one, before the notes."""
    results_md = ROOT / "bench" / "RESULTS.md"
    text = results_md.read_text()
    text = re.sub(rf"<!-- {tag}: generated.*?<!-- /{tag} -->\n?", "", text, flags=re.S)
    marker = "<!-- notes -->"
    if marker in text:
        text = text.replace(marker, section + "\n\n" + marker, 1)
    else:
        text += "\n" + section + "\n"
    results_md.write_text(text)


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def write_results(results: dict[str, list[dict]]) -> None:
    keys = [("rps", "max req/s", "{:,.0f}"), ("cpu_us", "CPU µs/req", "{:.1f}"),
            ("p50_ms", f"p50 @{RATE}/s ms", "{:.3f}"), ("p99_ms", f"p99 @{RATE}/s ms", "{:.3f}"),
            ("p999_ms", f"p99.9 @{RATE}/s ms", "{:.3f}"), ("idle_rss_mb", "idle RSS MB", "{:.1f}"),
            ("peak_rss_mb", "peak RSS MB", "{:.1f}"), ("startup_ms", "start-up ms", "{:.0f}")]
    med = {name: {k: median(rows, k) for k, _, _ in keys} for name, rows in results.items()}
    lines = ["| proxy | " + " | ".join(title for _, title, _ in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for name, m in med.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(m[k]) for k, _, fmt in keys) + " |")
    nip = med["nip"]
    ratio_lines = ["| nip ÷ … | CPU µs/req | max req/s | p99 |", "|---|---|---|---|"]
    for other in ["nginx", "haproxy", "pingora"]:
        o = med[other]
        ratio_lines.append(f"| {other} | {nip['cpu_us'] / o['cpu_us']:.2f} | "
                           f"{nip['rps'] / o['rps']:.2f} | {nip['p99_ms'] / o['p99_ms']:.2f} |")
    ratio_lines += ["", "Plugin cost (nip with a plugin on the route vs nip without):", "",
                    "| plugin | throughput change | added p99 µs | added CPU µs/req |", "|---|---|---|---|"]
    for name in ["nip+noop-plugin", "nip+header-plugin"]:
        p = med[name]
        ratio_lines.append(f"| {name.removeprefix('nip+')} | {(p['rps'] / nip['rps'] - 1) * 100:+.1f} % | "
                           f"{(p['p99_ms'] - nip['p99_ms']) * 1000:+.0f} | {p['cpu_us'] - nip['cpu_us']:+.1f} |")
    machine = subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown CPU")
    section = "\n".join([
        "<!-- generated by bench/bench.py; edit the notes below the table by hand -->",
        f"## Proxy overhead: medians of {RUNS} interleaved runs ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, {machine}. One proxy worker pinned to CPU 1; "
        f"wrk/oha and the nginx backend on CPU 0. {CONNECTIONS} connections, {DURATION} s per "
        f"phase, tiny bodies, HTTP/1.1 keep-alive both sides.",
        "",
        *lines,
        "",
        "Ratios (below 1.00 is better for CPU and p99, above 1.00 better for req/s):",
        "",
        *ratio_lines,
        "",
    ])
    results_md = ROOT / "bench" / "RESULTS.md"
    old = results_md.read_text() if results_md.exists() else ""
    marker = "<!-- notes -->"
    notes = old[old.index(marker):] if marker in old else marker + "\n"
    results_md.write_text("# Benchmark results\n\n" + section + "\n" + notes)
    print("\n".join(lines + [""] + ratio_lines))


if __name__ == "__main__":
    main()
