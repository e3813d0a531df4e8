"""Load generators: wrk (HTTP/1.1, a Lua script per variant) and h2load (HTTP/2, fixed rate).
"""

import os
import re
import subprocess

from . import BODY_DIR


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
