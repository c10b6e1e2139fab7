# jetsource developer tasks. `make` alone lists them.

.DEFAULT_GOAL := help
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

NATS_SERVER_VERSION := 2.15.1
TOOLS := $(CURDIR)/tools
NATS_SERVER := $(TOOLS)/bin/nats-server
export PATH := $(TOOLS)/bin:$(HOME)/.cargo/bin:$(PATH)

.PHONY: help setup build run cluster test bench bench-peer chaos lint fmt clean-data

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: ## Install what is missing: pinned nats-server into tools/; redis-server, openssl, chromium (console tests) via apt
	@scripts/install-nats-server.sh $(NATS_SERVER_VERSION) $(TOOLS)
	@scripts/install-apt.sh redis-server=redis-server redis-cli=redis-tools openssl=openssl chromium=chromium

build: ## Build every binary (debug)
	cargo build --workspace --bins

# `make run APP=shop` (or `make cluster APP=shop`) runs the shop example
# instead of the bank.
# Both run as production would: TLS to NATS (clients and routes) and Redis
# with a development CA, one NATS user per role and Redis ACL users, all
# generated on first use into .run/ (`source .run/client.env` before the
# CLI's send and query, `.run/admin.env` before its operator commands;
# docs/SECURITY.md, docs/TLS.md).
run: setup build ## Start nats-server, redis-server and the workers in the foreground (APP=bank|shop; credentials in .run/); Ctrl-C stops all
	APP=$(APP) scripts/run-dev.sh

cluster: setup build ## Like run, on a local 3-node nats-server cluster with replicas 3 (APP=bank|shop)
	APP=$(APP) scripts/run-cluster.sh

test: setup build ## Run every test against real servers (needs nothing running)
	@if cargo nextest --version >/dev/null 2>&1; then \
	  cargo nextest run --workspace --no-fail-fast; \
	else \
	  cargo test --workspace --no-fail-fast; \
	fi
	cargo test --workspace --doc

bench: setup bench-peer ## Full benchmark suite (release build; single node, 3-node cluster, then the PostgreSQL peer); rewrites docs/BENCHMARKS.md and docs/bench/
	cargo build --release --workspace --bins
	target/release/jetsource-bench --out docs

# The PostgreSQL peer (cqrs-es + postgres-es) is its own workspace under
# bench/peer, kept out of `make build`/`make test`; it shares target/ so that
# target/release/jetsource-bench-peer sits beside jetsource-bench, where the
# benchmark looks for it (`--peer-binary` elsewhere, `--no-peer` without). Debian keeps
# initdb off PATH, hence the path pattern.
bench-peer: ## Install PostgreSQL if missing and build the benchmark's PostgreSQL peer (target/release/jetsource-bench-peer)
	@scripts/install-apt.sh '/usr/lib/postgresql/*/bin/initdb=postgresql'
	CARGO_TARGET_DIR=$(CURDIR)/target cargo build --release --manifest-path bench/peer/Cargo.toml

# `make chaos SEED=7 DURATION=300`: SEED defaults to the clock (the run
# prints it), DURATION to the 180 s of issue 9.
SEED ?=
DURATION ?= 180

chaos: setup build ## Chaos run on a 3-node R3 cluster: load, killed nodes/workers/Redis, every check (SEED=, DURATION=)
	target/debug/jetsource-chaos --duration-secs $(DURATION) $(if $(SEED),--seed $(SEED))

lint: ## cargo fmt --check and clippy with warnings as errors
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	cargo fmt --all

clean-data: ## Delete the dev server's data and development credentials (.run/)
	rm -rf .run
