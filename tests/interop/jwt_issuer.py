"""An independent JWT issuer for the edge-policy tests (PyJWT + cryptography, no NIP code).

Keys: RSA (RS256, PS256), EC P-256 (ES256), Ed25519 (EdDSA), each with a kid. Serves over
HTTP on 127.0.0.1:PORT:
  /jwks.json        the public keys of the current generation (JWKS); counts fetches
  /fetches          how many times /jwks.json was fetched
  /rotate           a new generation: new keys with new kids replace the old ones
  /token?...        a JWT; parameters:
      alg=RS256|PS256|ES256|EdDSA   (default RS256)
      iss, aud, sub                 claims (defaults: this issuer, "api", "alice")
      ttl=SECONDS                   exp = now + ttl (negative: expired); no_exp=1 omits it
      nbf=SECONDS                   nbf = now + nbf
      roles=a,b                     a "roles" list claim
      org=ID                        a nested {"org": {"id": ID}} claim
      tier=T                        a "tier" claim
      sign=good|other|none|hs256-public
          other: the issuer's kid signed with a key the JWKS does not hold (a forgery)
          none: alg "none", no signature
          hs256-public: HS256 with the RSA public key (PEM) as the HMAC secret
Prints "listening" when ready.

Usage: jwt_issuer.py PORT
"""

import base64
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PORT = int(sys.argv[1])
ISSUER = f"http://127.0.0.1:{PORT}"
LOCK = threading.Lock()
STATE = {"generation": 0, "keys": None, "fetches": 0}


def new_keys(generation):
    return {
        "rsa": (f"rsa-{generation}", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "ec": (f"ec-{generation}", ec.generate_private_key(ec.SECP256R1())),
        "ed": (f"ed-{generation}", ed25519.Ed25519PrivateKey.generate()),
    }


STATE["keys"] = new_keys(0)
FORGER = new_keys("forger")


def jwks(keys):
    out = []
    for kind, (kid, key) in keys.items():
        public = key.public_key()
        if kind == "rsa":
            jwk = json.loads(RSAAlgorithm.to_jwk(public))
        elif kind == "ec":
            jwk = json.loads(ECAlgorithm.to_jwk(public))
        else:
            jwk = json.loads(OKPAlgorithm.to_jwk(public))
        jwk.update({"kid": kid, "use": "sig"})
        out.append(jwk)
    return {"keys": out}


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(query):
    now = int(time.time())
    claims = {
        "iss": query.get("iss", ISSUER),
        "aud": query.get("aud", "api"),
        "sub": query.get("sub", "alice"),
        "iat": now,
    }
    if "no_exp" not in query:
        claims["exp"] = now + int(query.get("ttl", "300"))
    if "nbf" in query:
        claims["nbf"] = now + int(query["nbf"])
    if "roles" in query:
        claims["roles"] = [r for r in query["roles"].split(",") if r]
    if "org" in query:
        claims["org"] = {"id": query["org"]}
    if "tier" in query:
        claims["tier"] = query["tier"]
    alg = query.get("alg", "RS256")
    sign = query.get("sign", "good")
    kind = {"RS256": "rsa", "PS256": "rsa", "ES256": "ec", "EdDSA": "ed"}[alg]
    with LOCK:
        kid, key = STATE["keys"][kind]
    if sign == "other":
        # A forgery: the issuer's kid, another key.
        key = FORGER[kind][1]
    if sign == "none":
        header = {"alg": "none", "typ": "JWT", "kid": kid}
        return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."
    if sign == "hs256-public":
        # The classic confusion attack: the verifier's RSA public key used as an HMAC secret.
        pem = STATE["keys"]["rsa"][1].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = {"alg": "HS256", "typ": "JWT", "kid": STATE["keys"]["rsa"][0]}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        import hashlib
        import hmac

        signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(signature)}"
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


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
        if url.path == "/jwks.json":
            with LOCK:
                STATE["fetches"] += 1
                keys = STATE["keys"]
            self.answer(json.dumps(jwks(keys)))
        elif url.path == "/fetches":
            with LOCK:
                self.answer(str(STATE["fetches"]), "text/plain")
        elif url.path == "/rotate":
            with LOCK:
                STATE["generation"] += 1
                STATE["keys"] = new_keys(STATE["generation"])
            self.answer("rotated", "text/plain")
        elif url.path == "/token":
            self.answer(token(query), "text/plain")
        else:
            self.send_response(404)
            self.end_headers()


server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
print("listening", flush=True)
server.serve_forever()
