"""`make drain-clients`: handoff's drain as real client libraries see it.

For each client (bench/drain-clients/clients/, the Rust crate in rust/, the Go program in go/)
and topology, the runner starts its own upstream (the `payments` example, release build), its
own Envoy with handoff's drain (envoy/drain.yaml, `--concurrency 2`), then the client as a
subprocess: a closed loop of GET requests. Timeline, measured from the client's READY line:

    1 s serving | POST the drain (grace G) | G s draining | 1 s drained | DELETE | 1 s serving

The client prints one record per request; the runner classifies them by start time against
the drain's own `since` (from the POST's answer) and reads Envoy's counters around the grace.
Clients that show errors or non-2xx during the grace are run again with each mitigation.
Raw results go to bench/drain-clients/results.json; the table to results.md and to the
matrix block of docs/drain-clients.md.

    run.py run [--clients a,b] [--topologies direct,mesh] [--mitigations all|none|a,b] [--grace S]
    run.py report      (re-render results.md and the docs table from results.json)
"""
import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ENVOY = os.environ.get("ENVOY_BIN") or os.path.join(ROOT, ".venv/bin/envoy")
WASM = os.environ.get("HANDOFF_WASM") or os.path.join(ROOT, "target/wasm32-wasip1/release/handoff.wasm")
PAYMENTS = os.path.join(ROOT, "target/release/examples/payments")
PY = os.path.join(HERE, ".venv/bin/python")
RUST_BIN = os.path.join(HERE, "rust/target/release/drain-client")
GO_BIN = os.path.join(HERE, "go/drain-client")
RESULTS = os.path.join(HERE, "results.json")
TABLE = os.path.join(HERE, "results.md")
DOC = os.path.join(ROOT, "docs/drain-clients.md")
ADMIN_PATH = "/.well-known/handoff/drain"
CONCURRENCY = 4
SERVING_S, DRAINED_S, AFTER_S = 1.0, 1.0, 1.0
# A 503 whose request started this close to the end of the grace is the drained answer
# racing the clock, not a failure of the grace.
EDGE_MS = 150.0
# The hints-first mitigation: GOAWAY / `connection: close` this long after the hints start.
HINTS_FIRST_DELAY_S = 1.0

# name -> (protocol, command without --url/--concurrency)
CLIENTS = {
    "python-httpx-h1": ("HTTP/1.1", [PY, "clients/py_client.py", "--lib", "httpx", "--proto", "h1"]),
    "python-httpx-h2": ("HTTP/2", [PY, "clients/py_client.py", "--lib", "httpx", "--proto", "h2"]),
    "python-requests": ("HTTP/1.1", [PY, "clients/py_client.py", "--lib", "requests"]),
    "rust-reqwest-h1": ("HTTP/1.1", [RUST_BIN, "--proto", "h1"]),
    "rust-reqwest-h2": ("HTTP/2", [RUST_BIN, "--proto", "h2"]),
    "node-fetch": ("HTTP/1.1", ["node", "clients/node_client.mjs", "--lib", "fetch"]),
    "node-http2": ("HTTP/2", ["node", "clients/node_client.mjs", "--lib", "http2"]),
    "go-net-http-h1": ("HTTP/1.1", [GO_BIN, "-proto", "h1"]),
    "go-x-net-http2-h2c": ("HTTP/2", [GO_BIN, "-proto", "h2c"]),
    "curl-h1": ("HTTP/1.1", [PY, "clients/cli_client.py", "--tool", "curl", "--proto", "h1"]),
    "curl-h2": ("HTTP/2", [PY, "clients/cli_client.py", "--tool", "curl", "--proto", "h2"]),
    "nghttp-h2": ("HTTP/2", [PY, "clients/cli_client.py", "--tool", "nghttp", "--proto", "h2"]),
}

# Clients whose records carry no response headers (nghttp --stat).
NO_HEADERS = {"nghttp-h2"}

# Mitigations: how the drain is configured and driven. `goaway_after_s` None = handoff's own
# `envoy_admin` sends /healthcheck/fail at the start; a number = the runner sends it that long
# after the start (handoff without `envoy_admin`); "never" = no Envoy drain at all.
MITIGATIONS = {
    "none": {"what": "envoy/drain.yaml as shipped", "goaway_after_s": None},
    "drain_timeout_250ms": {"what": "HCM drain_timeout 0.25 s (default 5 s): the final GOAWAY and close come sooner",
                            "goaway_after_s": None, "drain_timeout": "0.25s"},
    "hints_first_1s": {"what": f"hints first, GOAWAY / connection: close {HINTS_FIRST_DELAY_S:g} s later",
                       "goaway_after_s": HINTS_FIRST_DELAY_S},
    "no_goaway": {"what": "no Envoy drain (no envoy_admin): hints, then the retryable 503",
                  "goaway_after_s": "never"},
    # Envoy's drain on /healthcheck/fail applies to listeners of drain_type DEFAULT only: the
    # per-listener form of no_goaway, e.g. for a listener that serves such clients.
    "listener_modify_only": {"what": "envoy_admin kept, the listener's drain_type MODIFY_ONLY (/healthcheck/fail does not drain it)",
                             "goaway_after_s": None, "drain_type": "MODIFY_ONLY"},
}


# --- processes ---------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, timeout=5):
    req = urllib.request.Request(url, method=method, data=b"" if method != "GET" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def remap_ports(v, ports):
    if isinstance(v, dict):
        for k, child in v.items():
            if k == "port_value" and isinstance(child, int):
                ports.setdefault(child, free_port())
                v[k] = ports[child]
            else:
                remap_ports(child, ports)
    elif isinstance(v, list):
        for c in v:
            remap_ports(c, ports)


def each_dict(v):
    if isinstance(v, dict):
        yield v
        for c in v.values():
            yield from each_dict(c)
    elif isinstance(v, list):
        for c in v:
            yield from each_dict(c)


class Proc:
    def __init__(self, cmd, log_path, **kw):
        self.log = open(log_path, "w")
        self.p = subprocess.Popen(cmd, stdout=kw.pop("stdout", self.log), stderr=self.log, cwd=kw.pop("cwd", ROOT), **kw)

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self.log.close()


class Envoy(Proc):
    """An Envoy from a fixture (dict), its ports remapped; `ports` maps fixture -> real ports."""

    def __init__(self, cfg, ports, run_dir, name, concurrency):
        remap_ports(cfg, ports)
        self.ports = ports
        self.admin = cfg["admin"]["address"]["socket_address"]["port_value"]
        path = os.path.join(run_dir, f"{name}.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        super().__init__([ENVOY, "-c", path, "--concurrency", str(concurrency), "--disable-hot-restart",
                          "-l", "warning", "--log-path", os.path.join(run_dir, f"{name}.log")],
                         os.path.join(run_dir, f"{name}.out"))
        deadline = time.monotonic() + 60
        while True:
            if self.p.poll() is not None:
                raise RuntimeError(f"Envoy {name} exited: see {run_dir}")
            try:
                if http("GET", f"http://127.0.0.1:{self.admin}/ready", 1)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Envoy {name} not ready: see {run_dir}")
            time.sleep(0.05)

    def url(self, path, fixture_port=10000):
        return f"http://127.0.0.1:{self.ports[fixture_port]}{path}"

    def admin_post(self, path):
        return http("POST", f"http://127.0.0.1:{self.admin}{path}")

    def counters(self):
        _, body = http("GET", f"http://127.0.0.1:{self.admin}/stats?format=json")
        return {s["name"]: s.get("value", 0) for s in json.loads(body)["stats"] if "name" in s}


def server_config(mitigation):
    """envoy/drain.yaml, its handoff drain without the readiness probe (the app stays ready),
    with the mitigation's edits."""
    with open(os.path.join(ROOT, "envoy/drain.yaml")) as f:
        cfg = yaml.safe_load(f)
    m = MITIGATIONS[mitigation]
    for d in each_dict(cfg):
        code = d.get("vm_config", {}).get("code", {}).get("local", {})
        if code.get("filename", "").endswith("handoff.wasm"):
            code["filename"] = WASM
            plugin = json.loads(d["configuration"]["value"])
            plugin["drain"].pop("readiness", None)
            if m["goaway_after_s"] is not None:
                plugin["drain"].pop("envoy_admin", None)
            d["configuration"]["value"] = json.dumps(plugin)
        if m.get("drain_timeout") and "stat_prefix" in d and "route_config" in d:
            d["drain_timeout"] = m["drain_timeout"]
    for listener in cfg["static_resources"]["listeners"]:
        if m.get("drain_type"):
            listener["drain_type"] = m["drain_type"]
    return cfg


def start_client(name, url, run_dir):
    _, cmd = CLIENTS[name]
    c = Proc(cmd + ["--url", url, "--concurrency", str(CONCURRENCY)], os.path.join(run_dir, "client.err"),
             stdout=subprocess.PIPE, stdin=subprocess.PIPE, cwd=HERE, text=True)
    line = c.p.stdout.readline().strip()
    if line != "READY":
        c.stop()
        raise RuntimeError(f"{name} did not start ({line!r}): see {run_dir}/client.err")
    return c


def finish_client(c, name, run_dir):
    c.p.stdin.close()
    out = {}
    reader = threading.Thread(target=lambda: out.update(json.loads(c.p.stdout.readline() or "{}")))
    reader.start()
    reader.join(60)
    c.stop()
    if "records" not in out:
        raise RuntimeError(f"{name} printed no results: see {run_dir}/client.err")
    return out


# --- one run -----------------------------------------------------------------------------------

def one_run(client, topology, mitigation, grace_s, run_dir):
    os.makedirs(run_dir, exist_ok=True)
    procs = []
    try:
        app = Proc([PAYMENTS, "--name", "app", "--listen", "127.0.0.1:0"], os.path.join(run_dir, "app.err"),
                   stdout=subprocess.PIPE, text=True)
        procs.append(app)
        app_port = int(app.p.stdout.readline().split(":")[-1])
        drained = Envoy(server_config(mitigation), {8081: app_port}, run_dir, "server-a", 2)
        procs.append(drained)
        target = drained
        if topology == "mesh":
            other = Envoy(server_config(mitigation), {8081: app_port}, run_dir, "server-b", 1)
            procs.append(other)
            with open(os.path.join(HERE, "mesh-client.yaml")) as f:
                mesh = yaml.safe_load(f)
            target = Envoy(mesh, {10001: drained.ports[10000], 10002: other.ports[10000]}, run_dir, "client-side", 1)
            procs.append(target)
        c = start_client(client, target.url("/hello"), run_dir)
        procs.append(c)
        m = MITIGATIONS[mitigation]
        t0 = time.time() * 1000
        time.sleep(SERVING_S)
        before = drained.counters()
        status, body = http("POST", drained.url(f"{ADMIN_PATH}?grace_s={grace_s:g}"))
        assert status == 200, (status, body)
        since = json.loads(body)["since"]
        after_post = drained.counters()
        if isinstance(m["goaway_after_s"], float):
            time.sleep(m["goaway_after_s"])
            drained.admin_post("/healthcheck/fail")
        time.sleep(max(0.0, since / 1000 + grace_s - time.time()))
        end_grace = drained.counters()
        time.sleep(DRAINED_S)
        status, body = http("DELETE", drained.url(ADMIN_PATH))
        assert status == 200, (status, body)
        if isinstance(m["goaway_after_s"], float):
            drained.admin_post("/healthcheck/ok")
        cancel = time.time() * 1000
        drained_counters = drained.counters()
        time.sleep(AFTER_S)
        out = finish_client(c, client, run_dir)
        procs.remove(c)
    finally:
        for p in reversed(procs):
            p.stop()
    return summarize(out, t0, since, grace_s, cancel, before, after_post, end_grace, drained_counters)


def pct(vals, p):
    if not vals:
        return None
    vals = sorted(vals)
    return round(vals[min(len(vals) - 1, int(p / 100 * len(vals)))], 1)


def top_errors(recs, n=3):
    counts = {}
    for r in recs:
        if r[2] == 0:
            counts[r[3]] = counts.get(r[3], 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])[:n]


def delta(a, b, name):
    return b.get(name, 0) - a.get(name, 0)


def summarize(out, t0, since, grace_s, cancel, before, after_post, end_grace, drained_counters):
    recs = out["records"]
    grace_end = since + grace_s * 1000
    # A request still in flight when the drain starts belongs to the grace: it sees the drain.
    serving = [r for r in recs if t0 <= r[0] and r[0] + r[1] < since]
    grace = [r for r in recs if r[0] + r[1] >= since and r[0] < grace_end]
    # 503s at the very end of the grace are the drained phase starting (clock skew).
    grace_bad = [r for r in grace if not (200 <= r[2] < 300)
                 and not (r[2] == 503 and r[0] >= grace_end - EDGE_MS)]
    drained = [r for r in recs if grace_end <= r[0] < cancel]
    after = [r for r in recs if r[0] >= cancel]
    late_bad = [r for r in after if not (200 <= r[2] < 300)]
    around = [r[1] for r in recs if since - 500 <= r[0] < since + 500 and r[2]]
    d503 = [r for r in drained if r[2] == 503]
    rejected = delta(end_grace, drained_counters, "wasmcustom.handoff_drain_rejected")
    return {
        "versions": out.get("versions", {}),
        "node_sessions": out.get("sessions"),
        "requests": len(recs),
        "serving": {"n": len(serving), "errors": sum(1 for r in serving if r[2] == 0),
                    "non_2xx": sum(1 for r in serving if r[2] and not 200 <= r[2] < 300),
                    "p99_ms": pct([r[1] for r in serving], 99)},
        "grace": {"n": len(grace), "errors": sum(1 for r in grace_bad if r[2] == 0),
                  "non_2xx": sum(1 for r in grace_bad if r[2] != 0),
                  "ok": sum(1 for r in grace if 200 <= r[2] < 300),
                  "top_errors": top_errors(grace)},
        "p99_around_start_ms": pct(around, 99),
        "drained": {"n": len(drained), "503": len(d503),
                    "503_with_retry_after": sum(1 for r in d503 if r[4]),
                    "errors": sum(1 for r in drained if r[2] == 0),
                    "ok": sum(1 for r in drained if 200 <= r[2] < 300),
                    "rejected_by_handoff": rejected,
                    # A library that honours retry-after retries by itself, later: handoff
                    # rejects more than the caller sees, and the caller waits retry-after.
                    "retry_after_honoured": bool(rejected > len(drained) - sum(1 for r in drained if 200 <= r[2] < 300)
                                                 and any(r[1] >= 900 and r[2] for r in drained))},
        "after_cancel": {"n": len(after), "errors": sum(1 for r in after if r[2] == 0),
                         "non_2xx": len(late_bad),
                         "last_non_2xx_ms": round(max(r[0] for r in late_bad) - cancel, 1) if late_bad else None},
        "envoy": {
            "cx_during_grace": delta(after_post, end_grace, "http.ingress.downstream_cx_total"),
            "cx_serving": before.get("http.ingress.downstream_cx_total", 0),
            "drain_close": delta(after_post, end_grace, "http.ingress.downstream_cx_drain_close"),
        },
    }


# --- the matrix --------------------------------------------------------------------------------

def load():
    return subprocess.run(["cat", "/proc/loadavg"], capture_output=True, text=True).stdout.split()[:3]


def versions():
    v = {"envoy": subprocess.run([ENVOY, "--version"], capture_output=True, text=True).stdout.strip().split("version: ")[-1]}
    lock = os.path.join(HERE, "rust/Cargo.lock")
    if os.path.exists(lock):
        pkgs = open(lock).read().split("[[package]]")
        for p in pkgs:
            lines = dict(l.split(" = ", 1) for l in p.strip().splitlines() if " = " in l)
            name = lines.get("name", "").strip('"')
            if name in ("reqwest", "hyper", "hyper-util", "h2"):
                v[f"rust {name}"] = lines["version"].strip('"')
    dpkg = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "golang-golang-x-net-dev"],
                          capture_output=True, text=True).stdout
    if dpkg:
        v["golang.org/x/net"] = dpkg
    return v


def failing(r):
    return r["grace"]["errors"] + r["grace"]["non_2xx"] > 0


def cmd_run(args):
    for path, what in ((ENVOY, "make envoy"), (WASM, "make build"), (PAYMENTS, "cargo build --release --example payments")):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: {what} (make drain-clients does it)")
    names = args.clients.split(",") if args.clients else list(CLIENTS)
    topologies = args.topologies.split(",")
    if args.mitigations == "all":
        mitigations = [m for m in MITIGATIONS if m != "none"]
    elif args.mitigations == "none":
        mitigations = []
    else:
        mitigations = args.mitigations.split(",")
    out_dir = tempfile.mkdtemp(prefix="drain-clients-")
    started = time.time()
    data = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cores": os.cpu_count(), "load_before": load(), "grace_s": args.grace,
            "concurrency": CONCURRENCY, "versions": versions(),
            "mitigations": {k: v["what"] for k, v in MITIGATIONS.items()}, "runs": []}

    def run(client, topology, mitigation):
        tag = f"{client}/{topology}/{mitigation}"
        print(f"== {tag}", flush=True)
        try:
            r = one_run(client, topology, mitigation, args.grace, os.path.join(out_dir, tag.replace("/", "-")))
        except Exception as e:  # one broken client must not hide the others
            print(f"   FAILED: {e}", flush=True)
            r = {"failed": str(e)}
        r.update(client=client, protocol=CLIENTS[client][0], topology=topology, mitigation=mitigation)
        data["runs"].append(r)
        if "failed" not in r:
            g = r["grace"]
            print(f"   grace: {g['ok']} ok, {g['errors']} errors, {g['non_2xx']} non-2xx; "
                  f"drained 503: {r['drained']['503']}; new cx in grace: {r['envoy']['cx_during_grace']}", flush=True)
        return r

    for client in names:
        for topology in topologies:
            base = run(client, topology, "none")
            if topology == "direct" and "failed" not in base and (failing(base) or args.mitigate_all):
                for m in mitigations:
                    run(client, topology, m)
    data["load_after"] = load()
    data["seconds"] = round(time.time() - started)
    with open(RESULTS, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    render(data)
    print(f"wrote {RESULTS}, {TABLE} ({data['seconds']} s; runs kept in {out_dir})")
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)


def cell_grace(r):
    g = r["grace"]
    s = f"{g['errors']} / {g['non_2xx']}"
    return f"**{s}**" if g["errors"] + g["non_2xx"] else s


def render(data):
    rows = ["| client | protocol | topology | mitigation | requests in grace | transport errors / non-2xx in grace "
            "| drained: 503 (with retry-after) | honours retry-after | new connections in grace | p99 serving / around start (ms) "
            "| non-2xx after cancel (last at +ms) |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in data["runs"]:
        if "failed" in r:
            rows.append(f"| {r['client']} | {r['protocol']} | {r['topology']} | {r['mitigation']} | run failed: {r['failed'][:80]} |||||||")
            continue
        d, a = r["drained"], r["after_cancel"]
        last = f" (+{a['last_non_2xx_ms']:.0f})" if a["last_non_2xx_ms"] is not None else ""
        ra = f"{d['503']} ({'n/a' if r['client'] in NO_HEADERS else d['503_with_retry_after']})"
        rows.append(f"| {r['client']} | {r['protocol']} | {r['topology']} | {r['mitigation']} | {r['grace']['n']} "
                    f"| {cell_grace(r)} | {ra} | {'yes' if d['retry_after_honoured'] else 'no'} "
                    f"| {r['envoy']['cx_during_grace']} | {r['serving']['p99_ms']} / {r['p99_around_start_ms']} "
                    f"| {a['non_2xx']}{last} |")
    errs = []
    for r in data["runs"]:
        for msg, n in r.get("grace", {}).get("top_errors", []):
            errs.append(f"- {r['client']} ({r['topology']}, {r['mitigation']}): {n} × `{msg}`")
    head = (f"Measured {data['date']} on {data['cores']} cores (load average {' '.join(data['load_before'])} before, "
            f"{' '.join(data['load_after'])} after; other work shared the machine), Envoy {data['versions'].get('envoy')}, "
            f"grace {data['grace_s']:g} s, {data['concurrency']} concurrent loops per client, {data['seconds']} s in all.")
    seen, vers = set(), []
    for r in data["runs"]:
        if r["client"] not in seen and r.get("versions"):
            seen.add(r["client"])
            vers.append(f"- {r['client']}: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    shared = ", ".join(f"{k} {v}" for k, v in data["versions"].items() if k != "envoy")
    table = "\n".join([head, "", *rows, "", "Most frequent transport errors during the grace:", "", *(errs or ["- none"]),
                       "", "Client versions:", "", *vers, f"- built for the Rust and Go clients: {shared}"]) + "\n"
    with open(TABLE, "w") as f:
        f.write("# Drain through real clients: the matrix\n\nGenerated by `make drain-clients` "
                "(bench/drain-clients/run.py) from results.json; see docs/drain-clients.md.\n\n" + table)
    if os.path.exists(DOC):
        doc = open(DOC).read()
        begin, end = "<!-- matrix:begin -->", "<!-- matrix:end -->"
        if begin in doc and end in doc:
            pre, rest = doc.split(begin, 1)
            _, post = rest.split(end, 1)
            with open(DOC, "w") as f:
                f.write(pre + begin + "\n" + table + end + post)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--clients", default="")
    r.add_argument("--topologies", default="direct,mesh")
    r.add_argument("--mitigations", default="all")
    r.add_argument("--mitigate-all", action="store_true", help="run the mitigations for passing clients too")
    r.add_argument("--grace", type=float, default=3.0)
    r.add_argument("--keep", action="store_true", help="keep the per-run logs")
    sub.add_parser("report")
    args = p.parse_args()
    if args.cmd == "run":
        cmd_run(args)
    else:
        render(json.load(open(RESULTS)))


if __name__ == "__main__":
    main()
