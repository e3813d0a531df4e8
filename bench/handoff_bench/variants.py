"""What is measured: the variants, their requests, and the plugin configurations and bodies they use.
"""

import hashlib
import json
import os

from . import BODY_DIR


# ---------------------------------------------------------------------------------------------
# Payloads: the payments example of the translate contract, padded with a `description` and an
# `items` array that both versions name the same way, so Envoy's transform filter (D2) can carry
# them too. The response's bulk is the `data` array, which the contract maps element by element
# (`/data/*/id` <-> `/payments/*/transaction_id`).
# ---------------------------------------------------------------------------------------------


def v1_request(size):
    body = {"amount": 1250, "currency": "EUR", "customer_id": "c-42", "description": "", "items": []}
    i = 0
    while len(json.dumps(body, separators=(",", ":"))) < size - 60:
        i += 1
        body["items"].append({"sku": "sku-%05d" % i, "qty": 1 + i % 3, "price": 100 + i})
    pad = size - len(json.dumps(body, separators=(",", ":")))
    body["description"] = "x" * max(pad, 0)
    return json.dumps(body, separators=(",", ":"))


def v2_response(size):
    body = {"id": "tx-1", "status": "succeeded", "data": []}
    i = 0
    while len(json.dumps(body, separators=(",", ":"))) < size - 40:
        i += 1
        body["data"].append({"id": "tx-%06d" % i, "status": "succeeded"})
    return json.dumps(body, separators=(",", ":"))


SMALL_V1_REQUEST = json.dumps({"amount": 1250, "currency": "EUR", "customer_id": "c-42"}, separators=(",", ":"))
SMALL_V1_RESPONSE = json.dumps(
    {"transaction_id": "tx-1", "status": "succeeded", "amount": 1250, "currency": "EUR", "customer_id": "c-42"},
    separators=(",", ":"),
)
BODIES = {
    "req-1k.json": lambda: v1_request(1024),
    "req-64k.json": lambda: v1_request(65536),
    "resp-1k.json": lambda: v2_response(1024),
    "resp-64k.json": lambda: v2_response(65536),
    "req-small.json": lambda: SMALL_V1_REQUEST,
    "resp-small.json": lambda: SMALL_V1_RESPONSE,
}

# ---------------------------------------------------------------------------------------------
# handoff plugin configurations, one per capability, as the docs/configure/ pages describe them.
# ---------------------------------------------------------------------------------------------

CANARY = {"salt": "bench-2026", "percent": 50, "user_id": [{"header": "x-user-id"}], "route_header": "x-canary-variant"}
# The canary guard on top: every request counted (status, latency bucket) for the window judgment.
CANARY_GUARD = dict(CANARY, guard={"window_s": 10, "latency": {"quantile": 0.99, "max_ms": 500}})
# The canary with an allow list of n user ids (none of them the ids the bench sends): what a long
# list costs in memory, per worker.
ALLOW_SMALL, ALLOW_LARGE = 10, 100000


def canary_allow(n):
    return dict(CANARY, allow=["allow-%06d" % i for i in range(n)])
TRANSLATE = {
    "routes": [
        {
            "name": "payments",
            "v1_prefix": "/api/v1/payments",
            "v2_prefix": "/api/v2/payments",
            "backend": "v2",
            "request": [
                {"v1": "/amount", "v2": "/amount/value"},
                {"v1": "/currency", "v2": "/amount/currency"},
                {"v1": "/customer_id", "v2": "/customer/id", "required": True},
                {"v2": "/customer/email", "default": None},
                {"v1": "/description", "v2": "/description"},
                {"v1": "/items", "v2": "/items"},
            ],
            "response": [
                {"v1": "/transaction_id", "v2": "/id"},
                {"v1": "/status", "v2": "/status"},
                {"v1": "/payments/*/transaction_id", "v2": "/data/*/id"},
                {"v1": "/payments/*/status", "v2": "/data/*/status"},
            ],
            "unmapped": "drop",
            "translate_errors": False,
            "max_body_bytes": 1048576,
        }
    ]
}


def idempotency(max_entries):
    return {
        "header": "idempotency-key",
        "methods": ["POST", "PATCH"],
        "path_prefixes": ["/"],
        "required": True,
        "store": {"type": "local", "max_entries": max_entries, "max_response_bytes": 65536},
    }


DRAIN = {
    # Only triggers that cannot fire during the benchmark: no readiness polling (there is no app
    # behind a direct_response route), a token nobody sends.
    "admin": {"path": "/.well-known/handoff/drain", "token_sha256": hashlib.sha256(b"bench-token").hexdigest()},
    "upstream_signal": {"header": "x-drain"},
    "envoy_admin": {"cluster": "envoy_admin"},
    "grace_s": 10,
    "reconnect_jitter_ms": 5000,
    "retry_after_s": 1,
}

# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


class Variant:
    def __init__(self, name, config, title, method="GET", path="/api/v1/payments", body=None, headers=None,
                 keys=None, wasm=None, sections=(), upstream=None, base="A", concurrency=1):
        self.name = name
        self.config = config  # bench/envoy/<config>.yaml
        self.title = title
        self.method = method
        self.path = path
        self.body = body  # bench/envoy/bodies/<body>
        self.headers = dict(headers or {})
        self.keys = keys  # None | "unique" (a new Idempotency-Key per request) | "fixed" (replays)
        self.wasm = wasm  # None | "noop" | "handoff"
        self.sections = sections
        self.upstream = upstream  # None (direct_response) | "payments" (the example) | "static" (an Envoy)
        self.base = base  # the no-filter variant with the same route: what "added CPU" is measured from
        self.concurrency = concurrency  # Envoy's worker threads (each has its own wasm VM)

    def body_bytes(self):
        if not self.body:
            return b""
        with open(os.path.join(BODY_DIR, self.body), "rb") as f:
            return f.read()


UID = {"x-user-id": "u-12345"}
JSON_CT = {"content-type": "application/json"}
VARIANTS = [
    Variant("A", "a-none", "no filter, direct_response"),
    Variant("A-up", "a-upstream", "no filter, POST forwarded to the payments example (real upstream)",
            method="POST", body="req-small.json", headers=JSON_CT, upstream="payments"),
    Variant("A-fwd", "a-forward-1k", "no filter, POST 1 KB forwarded to a static upstream (baseline of C3, D2)",
            method="POST", body="req-1k.json", headers=JSON_CT, upstream="static"),
    Variant("A-fwd64", "a-forward-64k", "no filter, POST 64 KB forwarded to a static upstream (baseline of C4)",
            method="POST", path="/api/v1/payments?size=64k", body="req-64k.json", headers=JSON_CT, upstream="static"),
    Variant("B", "b-noop", "wasm filter that does nothing (bench/noop)", wasm="noop"),
    Variant("C1", "c1-canary", "handoff, canary only, GET", headers=UID, wasm="handoff", sections=("canary",)),
    Variant("C1-guard", "c1-guard", "handoff, canary with its guard (errors and p99 judged per window), GET", headers=UID,
            wasm="handoff", sections=("canary",)),
    Variant("C2", "c2-all", "handoff, every capability configured, GET (v2 client, v2 backend)",
            path="/api/v2/payments", headers=UID, wasm="handoff",
            sections=("canary", "translate", "idempotency", "drain")),
    Variant("C3", "c3-translate-1k", "handoff, POST 1 KB, v1->v2 request and v2->v1 response",
            method="POST", body="req-1k.json", headers=JSON_CT, wasm="handoff", sections=("translate",),
            upstream="static", base="A-fwd"),
    Variant("C4", "c4-translate-64k", "handoff, POST 64 KB, v1->v2 request and v2->v1 response",
            method="POST", path="/api/v1/payments?size=64k", body="req-64k.json", headers=JSON_CT, wasm="handoff",
            sections=("translate",), upstream="static", base="A-fwd64"),
    Variant("C5-first", "c5-idempotency", "handoff, POST with a new Idempotency-Key each request (local store), forwarded",
            method="POST", path="/api/v1/payments?size=small", body="req-small.json", headers=JSON_CT, keys="unique",
            wasm="handoff", sections=("idempotency",), upstream="static", base="A-up"),
    Variant("C5-replay", "c5-idempotency", "handoff, POST replayed from the local store (same key), not forwarded",
            method="POST", path="/api/v1/payments?size=small", body="req-small.json", headers=JSON_CT, keys="fixed",
            wasm="handoff", sections=("idempotency",), upstream="static", base="A-up"),
    Variant("D1", "d1-lua", "Envoy Lua filter: FNV-1a hash of x-user-id, a header set", headers=UID),
    Variant("D2", "d2-transform", "Envoy transform filter: the payments rewrite it can express (see gaps)",
            method="POST", body="req-1k.json", headers=JSON_CT, upstream="static", base="A-fwd"),
    Variant("D2-64", "d2-transform", "Envoy transform filter, as D2 with the 64 KB bodies of C4",
            method="POST", path="/api/v1/payments?size=64k", body="req-64k.json", headers=JSON_CT, upstream="static",
            base="A-fwd64"),
    # Memory of a long allow list: two workers, as Istio sidecars run (one wasm VM per worker).
    Variant("C1-allow-10", "c1-allow-10", "handoff, canary with a 10-id allow list, GET, --concurrency 2", headers=UID,
            wasm="handoff", sections=("canary",), concurrency=2),
    Variant("C1-allow-100k", "c1-allow-100k", "handoff, canary with a 100,000-id allow list, GET, --concurrency 2",
            headers=UID, wasm="handoff", sections=("canary",), concurrency=2),
]
# Configs written at run time into bench/out/ rather than kept in the repository (megabytes).
RUNTIME_CONFIGS = ("c1-allow-100k",)
SOAK_CONFIG = "c5-soak"
SOAK_ENTRIES = 10000  # the soak store's max_entries (the default)
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}
