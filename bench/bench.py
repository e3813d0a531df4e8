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

Method (see docs/benchmark.md): Envoy `--concurrency 1` pinned with `taskset -c 0`; wrk,
h2load and the upstream pinned with `taskset -c 1`; Envoy CPU per request from /proc/PID/stat
utime+stime divided by the requests Envoy completed (its own stats); every variant runs in every
round, rounds interleaved, medians and min-max reported. Python 3 standard library only, except
the chart (matplotlib, installed by the Makefile into bench/.venv).
"""

import argparse
import os

from handoff_bench.configs import cmd_configs, cmd_validate
from handoff_bench.measure import cmd_profile, cmd_run
from handoff_bench import ROOT
from handoff_bench.report import cmd_report


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
