"""The handoff benchmark as a package; bench/bench.py is its entry point.

Modules: variants (what is measured), configs (the Envoy configs, generated), envoy (one Envoy
under test), load (wrk and h2load), measure (a run), soak (the idempotency store under 1M
keys), report (results.md and the chart). Python's standard library only, except the chart
(matplotlib).
"""

import os


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")
CONF_DIR = os.path.join(BENCH, "envoy")
BODY_DIR = os.path.join(CONF_DIR, "bodies")
OUT = os.path.join(BENCH, "out")
GENERATED_DIR = os.path.join(OUT, "generated")  # configs too large for the repository, written by `bench.py run`
HANDOFF_WASM = "target/wasm32-wasip1/release/handoff.wasm"
# Measure another build of the filter without editing the configs: HANDOFF_WASM=/path/handoff.wasm
HANDOFF_WASM_RUN = os.environ.get("HANDOFF_WASM") or HANDOFF_WASM
NOOP_WASM = "bench/noop/target/wasm32-wasip1/release/noop.wasm"
PAYMENTS_BIN = "target/release/examples/payments"
MIB = 1024 * 1024
