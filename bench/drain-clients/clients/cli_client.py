"""The curl and nghttp loops of `make drain-clients`: each of `--concurrency` threads runs the
tool again and again with a batch of URLs. curl fetches a batch one after the other on one
reused connection (a new one after `connection: close` or GOAWAY); nghttp sends a batch as
concurrent streams on one HTTP/2 (h2c) connection.

    cli_client.py --tool curl|nghttp --proto h1|h2 --url URL --concurrency N

Same output as the other clients: `READY`, then one JSON line with one record per request
`[start unix ms, duration ms, status (0 on a transport error), error, retry-after]`. Start
times inside a batch are the batch start plus the durations before it (curl reports no wall
clock per transfer); nghttp reports its own request start offsets.
"""
import argparse
import json
import re
import subprocess
import sys
import threading
import time

BATCH = 20
CURL_FMT = "%{http_code} %{time_total} %{exitcode} %{header{retry-after}}|%{errormsg}\\n"
NGHTTP_ROW = re.compile(r"^\s*(\d+)\s+\+(\S+)\s+\+(\S+)\s+(\S+)\s+(\d+)\s+(\S+)\s+(\S+)\s*$")


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.split("\n")[0].strip()
    except OSError:
        return "missing"


def ms(v):
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float(v)


def curl_batch(args, n):
    cmd = ["curl", "-s", "-w", CURL_FMT, "--max-time", "10"]
    if args.proto == "h2":
        cmd.append("--http2-prior-knowledge")
    for _ in range(n):
        cmd += ["-o", "/dev/null", args.url]
    t0 = time.time() * 1000
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    recs, t = [], t0
    for line in out.splitlines():
        head, _, errmsg = line.partition("|")
        parts = head.split(" ")
        code, total, exitcode = int(parts[0]), float(parts[1]) * 1000, int(parts[2])
        ra = parts[3] if len(parts) > 3 and parts[3] else None
        if exitcode != 0 or code == 0:
            recs.append([t, total, 0, f"curl exit {exitcode}: {errmsg[:120]}", None])
        else:
            recs.append([t, total, code, "", ra])
        t += total
    # A transfer curl never reported (it gave up on the batch) is an error too.
    recs += [[t, 0.0, 0, "curl: transfer not attempted", None]] * (n - len(recs))
    return recs


def nghttp_batch(args, n):
    t0 = time.time() * 1000
    # nghttp fetches each distinct URI once: number them.
    sep = "&" if "?" in args.url else "?"
    uris = [f"{args.url}{sep}i={i}" for i in range(n)]
    p = subprocess.run(["nghttp", "-n", "--stat", "-t", "10"] + uris,
                       capture_output=True, text=True)
    recs = []
    for line in p.stdout.splitlines():
        m = NGHTTP_ROW.match(line)
        if m:
            end, start, code = ms(m.group(2)), ms(m.group(3)), int(m.group(5))
            recs.append([t0 + start, end - start, code, "", None])
    err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:120]
    recs += [[t0, 0.0, 0, f"nghttp: {err}", None]] * (n - len(recs))
    return recs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tool", choices=["curl", "nghttp"], required=True)
    p.add_argument("--proto", choices=["h1", "h2"], default="h1")
    p.add_argument("--url", required=True)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()
    batch = curl_batch if args.tool == "curl" else nghttp_batch
    deadline = time.monotonic() + 30
    while not any(0 < r[2] < 300 for r in batch(args, 1)):
        if time.monotonic() > deadline:
            sys.exit(f"no 2xx from {args.url}")
        time.sleep(0.05)
    print("READY", flush=True)
    stopped = threading.Event()
    records, lock = [], threading.Lock()

    def loop():
        while not stopped.is_set():
            recs = batch(args, BATCH)
            with lock:
                records.extend(recs)

    threads = [threading.Thread(target=loop) for _ in range(args.concurrency)]
    for th in threads:
        th.start()
    sys.stdin.read()
    stopped.set()
    for th in threads:
        th.join()
    tool = ["curl", "--version"] if args.tool == "curl" else ["nghttp", "--version"]
    print(json.dumps({"versions": {args.tool: version(tool)}, "records": records}), flush=True)


if __name__ == "__main__":
    main()
