#!/usr/bin/env python3
"""The cost of mutual TLS between two proxies: NIP → NIP beside nginx → nginx, same certificates.

    load ──HTTP──▶ A (plaintext in, mutual TLS out) ──mTLS──▶ B (verifies A's client
    certificate) ──HTTP──▶ backend (nginx `return 200`)

The PKI (a CA, B's certificate for 127.0.0.1, a client certificate for A and the load
generator) is made by openssl. Every proxy runs ONE worker; A and B share CPU 1, the load and
the backend CPU 0. Interleaved over RUNS rounds (medians):

* handshakes/s at B: `oha --disable-keepalive` with a client certificate (every request a
  new mutual TLS handshake), and B's CPU microseconds per handshake;
* kept-alive through the chain: `wrk -c50` at A, requests/s, and CPU microseconds per
  request of A and B together (A keeps its TLS connections to B open); NIP twice: with
  pingora's TLS connector (roots and name), and with a SAN matcher (NIP's connector).

Writes the section between `<!-- mtls:begin -->` and `<!-- mtls:end -->` of bench/RESULTS.md.
Environment: RUNS (3), DURATION seconds per phase (10).
"""

import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import bench  # the shared helpers of bench/bench.py

ROOT = bench.ROOT
OUT = bench.OUT / "mtls"
RUNS = int(os.environ.get("RUNS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))
BACKEND = "127.0.0.1:18100"
B_LISTEN = "127.0.0.1:18101"
A_LISTEN = "127.0.0.1:18102"
ADMIN_A, ADMIN_B = "127.0.0.1:18911", "127.0.0.1:18912"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], cwd=OUT, check=True, capture_output=True)


def make_pki() -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=bench CA",
            "-days", "2", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")
    for name, san, usage in [("server", "IP:127.0.0.1,DNS:localhost", "serverAuth"),
                             ("client", "URI:spiffe://nip.local/node/a", "clientAuth")]:
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (OUT / f"{name}.ext").write_text(
            f"subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt")


def nip_b() -> list[str]:
    conf = bench.write(OUT / "nip-b.yaml", f"""
admin: {{ address: "{ADMIN_B}" }}
api_gateway:
  address: "{B_LISTEN}"
  tls: {{ enabled: true, cert_file: "{OUT}/server.crt", key_file: "{OUT}/server.key", client_ca_file: "{OUT}/ca.crt", require_client_certificate: true }}
services:
  backend: {{ endpoints: ["{BACKEND}"] }}
routes:
  - service: backend
""")
    return [str(ROOT / "target/release/nip"), "proxy", "--config", str(conf), "--threads", "1"]


def nip_a(san_check: str = "") -> list[str]:
    name = "nip-a-san.yaml" if san_check else "nip-a.yaml"
    conf = bench.write(OUT / name, f"""
admin: {{ address: "{ADMIN_A}" }}
api_gateway: {{ address: "{A_LISTEN}" }}
services:
  b: {{ endpoints: ["{B_LISTEN}"], tls: {{ ca_file: "{OUT}/ca.crt", cert_file: "{OUT}/client.crt", key_file: "{OUT}/client.key"{san_check} }} }}
routes:
  - service: b
""")
    return [str(ROOT / "target/release/nip"), "proxy", "--config", str(conf), "--threads", "1"]


def nip_a_san() -> list[str]:
    """A checking B's certificate by SAN matcher: NIP's own TLS connector (and its relay)."""
    return nip_a(', match_typed_subject_alt_names: [{ san_type: DNS, matcher: { exact: localhost } }]')


def nginx(name: str, server: str) -> list[str]:
    conf = bench.write(OUT / f"nginx-{name}.conf", f"""
worker_processes 1;
daemon off;
error_log {OUT}/nginx-{name}-error.log;
pid {OUT}/nginx-{name}.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  {server}
}}
""")
    return ["nginx", "-c", str(conf)]


def nginx_b() -> list[str]:
    return nginx("b", f"""
  upstream backend {{ server {BACKEND}; keepalive 128; }}
  server {{
    listen {B_LISTEN} ssl backlog=4096;
    ssl_certificate {OUT}/server.crt;
    ssl_certificate_key {OUT}/server.key;
    ssl_client_certificate {OUT}/ca.crt;
    ssl_verify_client on;
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}""")


def nginx_a() -> list[str]:
    return nginx("a", f"""
  upstream b {{ server {B_LISTEN}; keepalive 128; }}
  server {{
    listen {A_LISTEN} backlog=4096;
    location / {{
      proxy_pass https://b;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_certificate {OUT}/client.crt;
      proxy_ssl_certificate_key {OUT}/client.key;
      proxy_ssl_trusted_certificate {OUT}/ca.crt;
      proxy_ssl_verify on;
      proxy_ssl_name localhost;  # nginx matches names, not IP SANs
      proxy_ssl_session_reuse on;
    }}
  }}""")


PAIRS = {"nip": (nip_a, nip_b), "nip-san": (nip_a_san, nip_b), "nginx": (nginx_a, nginx_b)}


def wait_ready(name: str) -> None:
    """Until a request through A (and so B) is answered."""
    if not bench.wait_for_200(f"http://{A_LISTEN}/", 15):
        raise RuntimeError(f"{name}: the chain A → B → backend did not answer (logs in {OUT})")


def handshakes(pids: list[int]) -> tuple[float, float]:
    """Requests/s with a new mutual TLS handshake each, and B's CPU µs per handshake."""
    before = bench.cpu_ticks(pids)
    out = subprocess.run(
        bench.taskset(bench.LOAD_CPU, [
            "oha", "-z", f"{DURATION}s", "-c", "8", "--disable-keepalive", "--no-tui",
            "--output-format", "json", "--cacert", str(OUT / "ca.crt"),
            "--cert", str(OUT / "client.crt"), "--key", str(OUT / "client.key"),
            f"https://{B_LISTEN}/"]),
        capture_output=True, text=True, check=True)
    ticks = bench.cpu_ticks(pids) - before
    stats = json.loads(out.stdout)
    ok = stats.get("statusCodeDistribution", {}).get("200", 0)
    rps = ok / DURATION
    return rps, ticks * 1e6 / bench.CLK_TCK / max(ok, 1)


def kept_alive(pids: list[int]) -> tuple[float, float]:
    """Requests/s through A → B on kept-alive connections, and A+B CPU µs per request."""
    before = bench.cpu_ticks(pids)
    out = subprocess.run(
        bench.taskset(bench.LOAD_CPU, ["wrk", "-t1", "-c50", f"-d{DURATION}s", f"http://{A_LISTEN}/"]),
        capture_output=True, text=True, check=True).stdout
    ticks = bench.cpu_ticks(pids) - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"errors through the chain: {out}")
    return requests / DURATION, ticks * 1e6 / bench.CLK_TCK / max(requests, 1)


def measure(name: str) -> dict[str, float]:
    make_a, make_b = PAIRS[name]
    logs = [open(OUT / f"{name}-{side}.log", "w") for side in ("b", "a")]
    b = subprocess.Popen(bench.taskset(bench.PROXY_CPU, make_b()), stdout=logs[0], stderr=logs[0])
    a = subprocess.Popen(bench.taskset(bench.PROXY_CPU, make_a()), stdout=logs[1], stderr=logs[1])
    try:
        wait_ready(name)
        time.sleep(0.5)
        b_pids = bench.pids_of(b.pid)
        hs_rps, hs_cpu = handshakes(b_pids)
        ka_rps, ka_cpu = kept_alive(b_pids + bench.pids_of(a.pid))
        return {"hs_rps": hs_rps, "hs_cpu": hs_cpu, "ka_rps": ka_rps, "ka_cpu": ka_cpu}
    finally:
        for process in (a, b):
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
        time.sleep(0.5)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    make_pki()
    backend = subprocess.Popen(bench.taskset(bench.LOAD_CPU, ["nginx", "-c", str(bench.nginx_backend_conf(OUT, BACKEND))]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in PAIRS}
    try:
        time.sleep(0.5)
        for _ in range(RUNS):
            for name in PAIRS:
                results[name].append(measure(name))
    finally:
        backend.terminate()
        backend.wait()
    median = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
              for name, runs in results.items()}
    nip, san, ngx = median["nip"], median["nip-san"], median["nginx"]
    day = time.strftime("%Y-%m-%d")
    section = f"""<!-- mtls:begin (generated by bench/mtls.py; rerun with bench/run.sh) -->
## Mutual TLS between two proxies: medians of {RUNS} interleaved runs ({day})

Load → A (plaintext in, mutual TLS out) → B (verifies A's client certificate) → backend;
the same openssl-made certificates (ECDSA P-256) for NIP and nginx; one worker each, A and B
on one CPU. Handshakes: `oha --disable-keepalive` with a client certificate straight at B.

| | NIP | nginx | NIP / nginx |
|---|---|---|---|
| mutual TLS handshakes/s at B | {nip['hs_rps']:,.0f} | {ngx['hs_rps']:,.0f} | {nip['hs_rps'] / ngx['hs_rps']:.2f} |
| B's CPU µs per handshake | {nip['hs_cpu']:.0f} | {ngx['hs_cpu']:.0f} | {nip['hs_cpu'] / ngx['hs_cpu']:.2f} |
| kept-alive requests/s through A → B | {nip['ka_rps']:,.0f} | {ngx['ka_rps']:,.0f} | {nip['ka_rps'] / ngx['ka_rps']:.2f} |
| A+B CPU µs per kept-alive request | {nip['ka_cpu']:.1f} | {ngx['ka_cpu']:.1f} | {nip['ka_cpu'] / ngx['ka_cpu']:.2f} |
| the same, A checking B by SAN matcher (NIP's connector) | {san['ka_cpu']:.1f} | {ngx['ka_cpu']:.1f} | {san['ka_cpu'] / ngx['ka_cpu']:.2f} |
<!-- mtls:end -->"""
    results_md = ROOT / "bench" / "RESULTS.md"
    text = results_md.read_text()
    pattern = re.compile(r"<!-- mtls:begin.*?<!-- mtls:end -->", re.S)
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    results_md.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
