"""One closed loop of `make drain-clients` for Python's httpx (HTTP/1.1 or HTTP/2 with prior
knowledge) and requests, each in its default configuration.

    py_client.py --lib httpx|requests --proto h1|h2 --url URL --concurrency N

`--concurrency` loops share one httpx.AsyncClient (its pool); requests gets a Session per
thread (a Session is not thread-safe). GET requests back to back until stdin closes. Prints
`READY` once a request succeeded, then one JSON line: versions and one record per request
`[start unix ms, duration ms, status (0 on a transport error), error, retry-after]`.
"""
import argparse
import asyncio
import importlib.metadata as md
import json
import sys
import threading
import time


def error_class(e):
    return f"{type(e).__name__}: {str(e)[:120]}"


def versions(names):
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


def wait_stdin_closed(stopped):
    sys.stdin.read()
    stopped.set()


async def run_httpx(args, stopped, records):
    import httpx

    client = httpx.AsyncClient(http1=args.proto == "h1", http2=args.proto == "h2", timeout=10)
    deadline = time.monotonic() + 30
    while True:
        try:
            if (await client.get(args.url)).status_code < 300:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"no 2xx from {args.url}")
        await asyncio.sleep(0.05)
    print("READY", flush=True)

    async def loop():
        while not stopped.is_set():
            t, start = time.time() * 1000, time.perf_counter()
            try:
                r = await client.get(args.url)
                records.append([t, (time.perf_counter() - start) * 1000, r.status_code, "",
                                r.headers.get("retry-after")])
            except Exception as e:  # every failure is a data point
                records.append([t, (time.perf_counter() - start) * 1000, 0, error_class(e), None])

    await asyncio.gather(*(loop() for _ in range(args.concurrency)))
    await client.aclose()


def run_requests(args, stopped, records):
    import requests

    warm = requests.Session()
    deadline = time.monotonic() + 30
    while True:
        try:
            if warm.get(args.url, timeout=10).status_code < 300:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"no 2xx from {args.url}")
        time.sleep(0.05)
    print("READY", flush=True)
    lock = threading.Lock()

    def loop():
        session = requests.Session()
        while not stopped.is_set():
            t, start = time.time() * 1000, time.perf_counter()
            try:
                r = session.get(args.url, timeout=10)
                rec = [t, (time.perf_counter() - start) * 1000, r.status_code, "",
                       r.headers.get("retry-after")]
            except Exception as e:
                rec = [t, (time.perf_counter() - start) * 1000, 0, error_class(e), None]
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=loop) for _ in range(args.concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lib", choices=["httpx", "requests"], required=True)
    p.add_argument("--proto", choices=["h1", "h2"], default="h1")
    p.add_argument("--url", required=True)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()
    if args.lib == "requests" and args.proto != "h1":
        sys.exit("requests speaks HTTP/1.1 only")
    stopped = threading.Event()
    threading.Thread(target=wait_stdin_closed, args=(stopped,), daemon=True).start()
    records = []
    if args.lib == "httpx":
        asyncio.run(run_httpx(args, stopped, records))
        names = ["httpx", "httpcore", "h2", "h11"]
    else:
        run_requests(args, stopped, records)
        names = ["requests", "urllib3"]
    print(json.dumps({"versions": versions(names), "records": records}), flush=True)


if __name__ == "__main__":
    main()
