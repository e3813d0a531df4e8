"""The Envoy configs of the variants (bench/envoy/*.yaml, generated: `bench.py configs`) and
their validation (`bench.py validate`).
"""

import json
import os
import re
import subprocess
import sys

from .envoy import MISSING_SECTION, envoy_binary, refusal_reason
from . import BODY_DIR, CONF_DIR, GENERATED_DIR, HANDOFF_WASM, NOOP_WASM, ROOT
from .variants import (ALLOW_LARGE, ALLOW_SMALL, BODIES, CANARY, CANARY_GUARD, DRAIN, RUNTIME_CONFIGS, SOAK_CONFIG,
                       SOAK_ENTRIES, TRANSLATE, canary_allow, idempotency)


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

# The shipped configs (envoy/*.yaml) put "hold" filters around handoff: after it, Envoy's buffer
# filter holds requests handoff marks with x-handoff-hold (translation, idempotency fingerprint)
# until their body is complete, and a header mutation removes the mark; before it, a small Lua
# filter holds translated responses (exact content-length, a failed translation becomes a 502).
# They are part of what these capabilities cost, so the variants carry them too, in the shipped
# form (tests/hold_filters.rs checks every copy; the Lua is read from envoy/lua/).
def _hold_lua(name):
    """The Lua of a hold filter, from its one source."""
    with open(os.path.join(ROOT, "envoy", "lua", name + ".lua")) as f:
        return f.read()


LUA_HOLD_RESPONSE = _hold_lua("handoff-hold-response")
HOLD_REQUEST = {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": 1048576}
HOLD_UNMARK = {"@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
               "mutations": {"request_mutations": [{"remove": "x-handoff-hold"}]}}


def lua_filter(name, code):
    return {"name": name, "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                                           "default_source_code": {"inline_string": code}}}


def hold_filter(name, wrapped, input_type, mark):
    """A hold filter as shipped: the filter wrapped in an ExtensionWithMatcher that skips it
    unless the stream carries handoff's mark, so unmarked requests do not pay for it."""
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
        "extension_config": {"name": name, "typed_config": wrapped}}}


def handoff_chain(plugin_config):
    """The handoff filter as the shipped configs deploy it for these sections."""
    f = wasm_filter("handoff", HANDOFF_WASM, plugin_config)
    chain = [f]
    if "translate" in plugin_config:
        lua = lua_filter("handoff-hold-response", LUA_HOLD_RESPONSE)["typed_config"]
        chain.insert(0, hold_filter("handoff-hold-response", lua, "HttpResponseHeaderMatchInput", "x-handoff-translated"))
    if "translate" in plugin_config or "idempotency" in plugin_config:
        for name, wrapped in (("handoff-hold-request", HOLD_REQUEST), ("handoff-hold-unmark", HOLD_UNMARK)):
            chain.append(hold_filter(name, wrapped, "HttpRequestHeaderMatchInput", "x-handoff-hold"))
    return chain


STATS_TAGS = [
    {"tag_name": n, "regex": r"^wasmcustom\.handoff_.*?(\.%s\.([^.]+))" % n}
    for n in ("variant", "reason", "outcome", "route", "direction", "message", "source", "state")
]

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
        "c1-guard": (
            "C1-guard: handoff with the canary section and its guard.",
            envoy_config(canary_routes(), handoff_chain({"canary": CANARY_GUARD}), handoff=True),
        ),
        "c1-allow-10": (
            "C1-allow-10: handoff with the canary section and a %d-id allow list (run with --concurrency 2)." % ALLOW_SMALL,
            envoy_config(canary_routes(), handoff_chain({"canary": canary_allow(ALLOW_SMALL)}), handoff=True),
        ),
        "c1-allow-100k": (
            "C1-allow-100k: handoff with the canary section and a %d-id allow list (run with --concurrency 2;\n"
            "# written at run time into bench/out/generated/, megabytes of ids)." % ALLOW_LARGE,
            envoy_config(canary_routes(), handoff_chain({"canary": canary_allow(ALLOW_LARGE)}), handoff=True),
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


def generated_files(runtime=False):
    """{path relative to bench/envoy: text} of every generated fixture; with `runtime`, only the
    configs too large to keep in the repository (RUNTIME_CONFIGS: `bench.py run` writes them)."""
    out = {} if runtime else {"bodies/" + name: make() for name, make in BODIES.items()}
    for stem, (comment, cfg) in config_files().items():
        if (stem in RUNTIME_CONFIGS) != runtime:
            continue
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


def write_runtime_configs():
    """The configs of RUNTIME_CONFIGS into bench/out/generated/, where the Envoy of a run finds them."""
    os.makedirs(GENERATED_DIR, exist_ok=True)
    for rel, text in generated_files(runtime=True).items():
        with open(os.path.join(GENERATED_DIR, rel), "w") as f:
            f.write(text)


# ---------------------------------------------------------------------------------------------
# validate
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
