#!/usr/bin/env python3
"""The cost of edge policy: CPU per request of a JWT check and of rate limits, NIP beside
nginx where open-source nginx has an equivalent.

Same bed as bench/bench.py (one proxy worker pinned to CPU 1, wrk and the nginx backend on
CPU 0, 50 keep-alive connections): for each proxy, interleaved over RUNS rounds, wrk
measures max req/s and the proxy's CPU microseconds per request.

* nip, nginx: plain proxying (the baselines)
* nip+jwt: every request carries the same RS256 token the proxy verifies (jwt_authn,
  keys inline, the verified-token cache on as the v4 form sets it). Open-source nginx has no JWT check (auth_jwt is in the commercial NGINX Plus),
  so there is no nginx row for it.
* nip+ratelimit, nginx+limit_req: a per-route bucket large enough never to refuse (the
  cost of the check, not of refusing)
* nip+ratelimit-per-client, nginx+limit_req-per-client: a bucket per client address
  (`key: { source_ip }` beside `limit_req_zone $binary_remote_addr`)

Appends its section to bench/RESULTS.md (replacing an older one). Needs openssl for the
signing key. Environment: RUNS (3), DURATION (10).
"""

import base64
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared bed)

OUT = bench.OUT
LISTEN, BACKEND, ADMIN = bench.LISTEN, bench.BACKEND, bench.ADMIN
RUNS = bench.RUNS
DURATION = bench.DURATION


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rs256_token_and_jwks() -> tuple[str, str]:
    """An RS256 token and the JWKS that verifies it, made with openssl."""
    key = OUT / "jwt-key.pem"
    if not key.exists():
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True,
                       capture_output=True)
    modulus = subprocess.run(["openssl", "rsa", "-in", str(key), "-noout", "-modulus"],
                             check=True, capture_output=True, text=True).stdout
    n = bytes.fromhex(modulus.strip().split("=", 1)[1])
    jwks = json.dumps({"keys": [{"kty": "RSA", "kid": "bench", "n": b64url(n), "e": "AQAB"}]})
    header = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "bench"}).encode())
    claims = {"iss": "https://bench", "aud": "api", "sub": "bench",
              "exp": int(time.time()) + 86400}
    payload = b64url(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key)],
                               input=signing_input, check=True, capture_output=True).stdout
    return f"{header}.{payload}.{b64url(signature)}", jwks


TOKEN, JWKS = rs256_token_and_jwks()


def nip_conf(name: str, extra: str, route: str) -> Path:
    return bench.write(OUT / f"{name}.yaml", f"""
admin: {{ address: "{ADMIN}" }}
api_gateway: {{ address: "{LISTEN}" }}
services:
  backend: {{ endpoints: ["{BACKEND}"] }}
{extra}
routes:
  - name: all
    service: backend
{route}
""")


def nginx_conf(name: str, http_extra: str, location_extra: str) -> Path:
    return bench.write(OUT / f"{name}.conf", f"""
worker_processes 1;
daemon off;
error_log {OUT}/{name}-error.log;
pid {OUT}/{name}.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream backend {{ server {BACKEND}; keepalive 128; }}
  {http_extra}
  server {{
    listen {LISTEN} backlog=4096;
    location / {{
      {location_extra}
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")


NIP = str(bench.ROOT / "target" / "release" / "nip")
JWT = f"""auth:
  jwt_providers:
    idp:
      issuer: https://bench
      audiences: [api]
      jwks: '{JWKS}'
"""
NEVER = "{ requests: 100000000, per: 1s }"
PROXIES = {
    "nip": lambda: [NIP, "proxy", "--config", str(nip_conf("policy-nip", "", ""))],
    "nip+jwt": lambda: [NIP, "proxy", "--config",
                        str(nip_conf("policy-nip-jwt", JWT, "    auth: { jwt: idp }"))],
    "nip+ratelimit": lambda: [NIP, "proxy", "--config",
                              str(nip_conf("policy-nip-rl", "", f"    rate_limit: {NEVER}"))],
    "nip+ratelimit-per-client": lambda: [
        NIP, "proxy", "--config",
        str(nip_conf("policy-nip-rl-client", "",
                     "    rate_limit: { requests: 100000000, per: 1s, key: { source_ip: true } }"))],
    "nginx": lambda: ["nginx", "-c", str(nginx_conf("policy-nginx", "", ""))],
    "nginx+limit_req": lambda: ["nginx", "-c", str(nginx_conf(
        "policy-nginx-rl", "limit_req_zone all zone=all:1m rate=10000000r/s;",
        "limit_req zone=all burst=1000000 nodelay;"))],
    "nginx+limit_req-per-client": lambda: ["nginx", "-c", str(nginx_conf(
        "policy-nginx-rl-client",
        "limit_req_zone $binary_remote_addr zone=client:10m rate=10000000r/s;",
        "limit_req zone=client burst=1000000 nodelay;"))],
}


def measure(name: str) -> dict:
    bench.PROXIES[name] = PROXIES[name]
    headers = (f"Authorization: Bearer {TOKEN}",) if name == "nip+jwt" else ()
    with bench.running(name, f"policy-{name}") as (pids, _):
        before = bench.cpu_ticks(pids)
        rps, total, errors = bench.run_wrk(headers)
        after = bench.cpu_ticks(pids)
    if errors:
        raise RuntimeError(f"{name}: {errors} non-2xx responses (the policy refused requests)")
    return {"rps": rps, "cpu_us": (after - before) * 1_000_000 / bench.CLK_TCK / max(total, 1)}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # Each proxy answers `wait_for_200` on / before measuring: a JWT-protected route needs
    # the token there too.
    original_wait = bench.wait_for_200

    def wait_with_token(url: str, deadline_s: float = 10.0) -> bool:
        import urllib.request
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
                with urllib.request.urlopen(request, timeout=1) as response:
                    if response.status == 200:
                        return True
            except Exception:
                time.sleep(0.05)
        return False

    bench.wait_for_200 = wait_with_token
    backend = subprocess.Popen(bench.taskset(bench.LOAD_CPU,
                                             ["nginx", "-c", str(bench.nginx_backend_conf())]))
    try:
        if not original_wait(f"http://{BACKEND}/"):
            sys.exit("bench: the nginx backend did not start")
        results = bench.interleave(list(PROXIES), measure)
    finally:
        backend.terminate()
        backend.wait()
    (OUT / "policy-raw.json").write_text(json.dumps(results, indent=2))
    write_results(results)


def write_results(results: dict[str, list[dict]]) -> None:
    med = {name: {k: statistics.median(r[k] for r in rows) for k in ("rps", "cpu_us")}
           for name, rows in results.items()}
    lines = ["| proxy | max req/s | CPU µs/req | CPU added by the policy µs/req |",
             "|---|---|---|---|"]
    for name, m in med.items():
        base = med["nip" if name.startswith("nip") else "nginx"]
        lines.append(f"| {name} | {m['rps']:,.0f} | {m['cpu_us']:.1f} | "
                     f"{m['cpu_us'] - base['cpu_us']:+.1f} |")
    ratios = ["| NIP ÷ nginx, CPU µs/req | plain | local rate limit | per client |",
              "|---|---|---|---|",
              f"| | {med['nip']['cpu_us'] / med['nginx']['cpu_us']:.2f} | "
              f"{med['nip+ratelimit']['cpu_us'] / med['nginx+limit_req']['cpu_us']:.2f} | "
              f"{med['nip+ratelimit-per-client']['cpu_us'] / med['nginx+limit_req-per-client']['cpu_us']:.2f} |"]
    section = "\n".join([
        "<!-- policy: generated by bench/policy.py -->",
        f"## Edge policy: medians of {RUNS} interleaved runs ({time.strftime('%Y-%m-%d')})",
        "",
        "The bed of the first table (one proxy worker on CPU 1, wrk -t1 -c50 and the backend "
        f"on CPU 0, {DURATION} s per phase). JWT: every request carries the same RS256 token "
        "(2048-bit key, keys inline); its claims are checked on every request and its "
        "signature once per worker thread (jwt_cache_config, which the v4 form sets; without "
        "the cache the check cost +35 µs/request on this machine). Open-source nginx has no "
        "JWT check (auth_jwt is NGINX Plus), so it has no row. Rate limits: buckets that never "
        "refuse, so the rows show the check's cost.",
        "",
        *lines,
        "",
        *ratios,
        "<!-- /policy -->",
    ])
    bench.put_section("policy", section)


if __name__ == "__main__":
    main()
