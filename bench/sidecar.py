#!/usr/bin/env python3
"""What two sidecars add: client → sidecar → sidecar → server against client → server,
for HTTP and for TCP, beside the same path through nginx (http and stream proxies).

Two network namespaces joined by a veth pair, as two pods: the client at 10.96.0.1, the
server at 10.96.0.2 running the applications (nginx `return 200` on :8080, redis on :6379).
Paths, interleaved over RUNS rounds (medians):

* direct: the client reaches the applications;
* NIP: a NIP sidecar in each pod (`sidecar: {}`, one worker, UID 1337) behind
  `nip iptables setup`; the client still dials 10.96.0.2 and is intercepted both ways;
* nginx: an nginx in each pod chained explicitly (it cannot intercept): http
  127.0.0.1:15001 → 10.96.0.2:15006 → :8080 with kept-alive upstreams, stream
  127.0.0.1:16001 → 10.96.0.2:16006 → :6379; one worker each.

Both proxies of a path share CPU 1; the load and the applications run on CPU 0. HTTP:
`oha` at a fixed RATE (open loop, 10 connections); TCP: `redis-benchmark` PING over 10
connections. Reported: p50/p99 added over direct, and the CPU microseconds both proxies
spent per request. Needs root (namespaces, iptables).

Writes the section between `<!-- sidecar:begin -->` and `<!-- sidecar:end -->` of
bench/RESULTS.md. Environment: RUNS (3), DURATION seconds per HTTP phase (10), RATE (2000),
TCP_REQUESTS per TCP phase (50000).
"""

import csv
import io
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import bench  # the shared helpers of bench/bench.py

ROOT = bench.ROOT
OUT = bench.OUT / "sidecar"
RUNS = int(os.environ.get("RUNS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))
RATE = int(os.environ.get("RATE", "2000"))
TCP_REQUESTS = int(os.environ.get("TCP_REQUESTS", "50000"))
CLIENT, SERVER = "nipb-client", "nipb-server"
SERVER_IP = "10.96.0.2"
PROXY_UID = "1337"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


def in_ns(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns] + argv


def make_pods() -> None:
    for ns in (CLIENT, SERVER):
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", "eth0", "netns", CLIENT, "type", "veth", "peer", "name", "eth0",
       "netns", SERVER)
    for ns, address in ((CLIENT, "10.96.0.1/24"), (SERVER, f"{SERVER_IP}/24")):
        sh("ip", "-n", ns, "addr", "add", address, "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")


def remove_pods() -> None:
    for ns in (CLIENT, SERVER):
        sh("ip", "netns", "del", ns, check=False)


def start(ns: str, cpu: str, argv: list[str], log: str, uid: str | None = None) -> subprocess.Popen:
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] + argv
    out = open(OUT / f"{log}.log", "w")
    return subprocess.Popen(in_ns(ns, bench.taskset(cpu, argv)), stdout=out, stderr=out)


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


# Debian builds nginx's stream proxy as a module (libnginx-mod-stream).
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def nginx_conf(name: str, body: str) -> Path:
    load = f"load_module {STREAM_MODULE};" if "stream {" in body else ""
    return bench.write(OUT / f"nginx-{name}.conf", f"""
{load}
worker_processes 1;
daemon off;
error_log {OUT}/nginx-{name}-error.log;
pid {OUT}/nginx-{name}.pid;
events {{ worker_connections 4096; }}
{body}
""")


def applications() -> list[subprocess.Popen]:
    web = nginx_conf("app", """
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 0.0.0.0:8080 backlog=4096; location / { return 200 "ok\\n"; } }
}""")
    return [
        start(SERVER, bench.LOAD_CPU, ["nginx", "-c", str(web)], "app-web"),
        start(SERVER, bench.LOAD_CPU, ["redis-server", "--port", "6379", "--bind", "0.0.0.0",
                                       "--protected-mode", "no", "--save", "", "--appendonly", "no"],
              "app-redis"),
    ]


def nip_sidecars() -> list[subprocess.Popen]:
    conf = bench.write(OUT / "sidecar.yaml", 'admin: { address: "127.0.0.1:15020" }\nsidecar: {}\n')
    os.chmod(OUT, 0o755)
    os.chmod(conf, 0o644)
    nip = str(ROOT / "target/release/nip")
    processes = [start(ns, bench.PROXY_CPU, [nip, "proxy", "--config", str(conf), "--threads", "1"],
                       f"nip-{ns}", uid=PROXY_UID) for ns in (CLIENT, SERVER)]
    for ns in (CLIENT, SERVER):
        for _ in range(200):
            if sh(*in_ns(ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              "http://127.0.0.1:15020/ready"]), check=False).stdout == "200":
                break
            time.sleep(0.05)
        sh(*in_ns(ns, [nip, "iptables", "setup", "--proxy-uid", PROXY_UID]))
    return processes


def nip_cleanup() -> None:
    for ns in (CLIENT, SERVER):
        sh(*in_ns(ns, [str(ROOT / "target/release/nip"), "iptables", "cleanup"]), check=False)


def nginx_sidecars() -> list[subprocess.Popen]:
    client = nginx_conf("client", f"""
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream peer {{ server {SERVER_IP}:15006; keepalive 128; }}
  server {{
    listen 127.0.0.1:15001 backlog=4096;
    location / {{ proxy_pass http://peer; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
stream {{ server {{ listen 127.0.0.1:16001; proxy_pass {SERVER_IP}:16006; }} }}""")
    server = nginx_conf("server", f"""
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream app {{ server 127.0.0.1:8080; keepalive 128; }}
  server {{
    listen {SERVER_IP}:15006 backlog=4096;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
stream {{ server {{ listen {SERVER_IP}:16006; proxy_pass 127.0.0.1:6379; }} }}""")
    return [start(CLIENT, bench.PROXY_CPU, ["nginx", "-c", str(client)], "nginx-client"),
            start(SERVER, bench.PROXY_CPU, ["nginx", "-c", str(server)], "nginx-server")]


# Where the client sends HTTP and TCP on each path.
TARGETS = {
    "direct": (f"http://{SERVER_IP}:8080/", (SERVER_IP, "6379")),
    "nip": (f"http://{SERVER_IP}:8080/", (SERVER_IP, "6379")),
    "nginx": ("http://127.0.0.1:15001/", ("127.0.0.1", "16001")),
}


def wait_http(url: str) -> None:
    for _ in range(400):
        if sh(*in_ns(CLIENT, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url]),
              check=False).stdout == "200":
            return
        time.sleep(0.05)
    raise RuntimeError(f"no answer from {url} (logs in {OUT})")


def http_phase(url: str, pids: list[int]) -> dict[str, float]:
    before = bench.cpu_ticks(pids)
    out = sh(*in_ns(CLIENT, bench.taskset(bench.LOAD_CPU, [
        "oha", "-z", f"{DURATION}s", "-q", str(RATE), "-c", "10", "--latency-correction",
        "--no-tui", "--output-format", "json", url]))).stdout
    ticks = bench.cpu_ticks(pids) - before
    data = json.loads(out)
    ok = data.get("statusCodeDistribution", {}).get("200", 0)
    if data["summary"]["successRate"] < 1.0:
        raise RuntimeError(f"HTTP failures on {url}: {data['summary']}")
    p = data["latencyPercentiles"]
    return {"http_p50": p["p50"] * 1000, "http_p99": p["p99"] * 1000,
            "http_cpu": ticks * 1e6 / bench.CLK_TCK / max(ok, 1)}


def tcp_phase(host: str, port: str, pids: list[int]) -> dict[str, float]:
    before = bench.cpu_ticks(pids)
    out = sh(*in_ns(CLIENT, bench.taskset(bench.LOAD_CPU, [
        "redis-benchmark", "-h", host, "-p", port, "-c", "10", "-n", str(TCP_REQUESTS),
        "-t", "ping", "--csv"]))).stdout
    ticks = bench.cpu_ticks(pids) - before
    rows = list(csv.DictReader(io.StringIO(out)))
    row = rows[0]
    return {"tcp_p50": float(row["p50_latency_ms"]), "tcp_p99": float(row["p99_latency_ms"]),
            "tcp_cpu": ticks * 1e6 / bench.CLK_TCK / (TCP_REQUESTS * len(rows))}


def measure(path: str) -> dict[str, float]:
    url, (host, port) = TARGETS[path]
    proxies: list[subprocess.Popen] = []
    try:
        if path == "nip":
            proxies = nip_sidecars()
        elif path == "nginx":
            proxies = nginx_sidecars()
        wait_http(url)
        time.sleep(0.5)
        pids = [pid for p in proxies for pid in bench.pids_of(p.pid)]
        # `ip netns exec … setpriv …` wrappers exec into the proxy: their pids are its.
        result = http_phase(url, pids)
        result.update(tcp_phase(host, port, pids))
        return result
    finally:
        if path == "nip":
            nip_cleanup()
        stop(proxies)
        time.sleep(0.5)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    make_pods()
    apps = applications()
    results: dict[str, list[dict[str, float]]] = {path: [] for path in TARGETS}
    try:
        wait_http(TARGETS["direct"][0])
        for _ in range(RUNS):
            for path in TARGETS:
                results[path].append(measure(path))
    finally:
        stop(apps)
        remove_pods()
    median = {path: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
              for path, runs in results.items()}
    direct, nip, ngx = median["direct"], median["nip"], median["nginx"]

    def added(m: dict[str, float], key: str) -> float:
        return max(m[key] - direct[key], 0.0)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b > 0 else "–"

    rows = []
    for label, key in (("HTTP p50 added (ms)", "http_p50"), ("HTTP p99 added (ms)", "http_p99"),
                       ("TCP p50 added (ms)", "tcp_p50"), ("TCP p99 added (ms)", "tcp_p99")):
        a, b = added(nip, key), added(ngx, key)
        rows.append(f"| {label} | {direct[key]:.3f} | {a:.3f} | {b:.3f} | {ratio(a, b)} |")
    for label, key in (("HTTP: CPU µs per request, both proxies", "http_cpu"),
                       ("TCP (redis PING): CPU µs per request, both proxies", "tcp_cpu")):
        rows.append(f"| {label} | – | {nip[key]:.1f} | {ngx[key]:.1f} | {ratio(nip[key], ngx[key])} |")
    day = time.strftime("%Y-%m-%d")
    section = f"""<!-- sidecar:begin (generated by bench/sidecar.py; rerun with bench/run.sh) -->
## Two sidecars: client → sidecar → sidecar → server, medians of {RUNS} interleaved runs ({day})

Two pods (network namespaces joined by veth). NIP: `sidecar: {{}}` in each pod behind `nip
iptables setup` (intercepted both ways, HTTP through both connection managers, redis
through both TCP proxies); nginx: its http and stream proxies chained explicitly. One worker
per proxy, both proxies on one CPU. HTTP: `oha` at {RATE} requests/s over 10 connections;
TCP: `redis-benchmark` PING over 10 connections. "direct" is the path without proxies.
The HTTP CPU ratio is the per-request cost of NIP's HTTP path (compare the single-proxy
table above); the TCP row is the relay's (bytes copied between sockets, no parsing).

| | direct | NIP sidecars | nginx proxies | NIP / nginx |
|---|---|---|---|---|
{chr(10).join(rows)}
<!-- sidecar:end -->"""
    results_md = ROOT / "bench" / "RESULTS.md"
    text = results_md.read_text()
    pattern = re.compile(r"<!-- sidecar:begin.*?<!-- sidecar:end -->", re.S)
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    results_md.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
