"""The soak: a million distinct Idempotency-Keys through the bounded local store, RSS sampled.
"""

import signal
import subprocess
import time

from .envoy import Envoy, refusal_reason, wait_first_2xx
from .load import pinned, wrk_script
from .variants import JSON_CT, SOAK_CONFIG, Variant


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
