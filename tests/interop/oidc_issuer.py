"""An independent OIDC issuer for tests (PyJWT + cryptography, no NIP code).

Serves over HTTP on 127.0.0.1:PORT:
  /.well-known/openid-configuration   issuer and jwks_uri, as any OIDC provider does
  /jwks.json                           its RSA public key as a JWK (kid "k1")
  /token?sub=S&role=R&tenants=a,b&aud=A&ttl=SECONDS&kid=K&sign=good|other
                                       a JWT signed RS256 by PyJWT; sign=other signs with a
                                       key the JWKS does not hold (a forgery)
Prints "listening" when ready.

Usage: oidc_issuer.py PORT
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

PORT = int(sys.argv[1])
ISSUER = f"http://127.0.0.1:{PORT}"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk():
    key = json.loads(RSAAlgorithm.to_jwk(KEY.public_key()))
    key.update({"kid": "k1", "use": "sig", "alg": "RS256"})
    return key


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, body, content_type="application/json"):
        data = body.encode()
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if url.path == "/.well-known/openid-configuration":
            self.answer(json.dumps({"issuer": ISSUER, "jwks_uri": f"{ISSUER}/jwks.json"}))
        elif url.path == "/jwks.json":
            self.answer(json.dumps({"keys": [jwk()]}))
        elif url.path == "/token":
            now = int(time.time())
            claims = {
                "iss": query.get("iss", ISSUER),
                "sub": query.get("sub", "alice"),
                "aud": query.get("aud", "nip"),
                "iat": now,
                "exp": now + int(query.get("ttl", "300")),
            }
            if "role" in query:
                claims["nip_role"] = query["role"]
            if "tenants" in query:
                claims["nip_tenants"] = [t for t in query["tenants"].split(",") if t]
            key = OTHER if query.get("sign") == "other" else KEY
            token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": query.get("kid", "k1")})
            self.answer(token, "text/plain")
        else:
            self.send_response(404)
            self.end_headers()


server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
print("listening", flush=True)
server.serve_forever()
