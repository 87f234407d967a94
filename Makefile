# Thin aliases; scripts/test and scripts/run are the real entry points.
.PHONY: test run generate lint bench bench-table

test:
	scripts/test

run:
	scripts/run

generate:
	go generate ./...

# The static checks of scripts/test, without services or tests.
lint:
	@out=$$(find . \( -name .git -o -name .local -o -name node_modules \) -prune -o -name '*.go' -type f -print0 | xargs -0 -r gofmt -l); \
	if [ -n "$$out" ]; then echo "not gofmt-ed (run gofmt -w):"; echo "$$out"; exit 1; fi
	go vet ./...
	@if [ -f package.json ]; then \
		if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then npm ci --no-audit --no-fund; fi; \
		npx --no-install redocly lint openapi.yaml; \
	fi

# The load tool (cmd/imbench) against a running imd, every scenario once:
#   make bench BENCH_URL=http://127.0.0.1:8080 IMD_ADMIN_TOKEN=... BENCH_FLAGS='--duration 10s'
# One JSON line per scenario on stdout; fails if any scenario failed.
BENCH_URL ?= http://127.0.0.1:8080
BENCH_SCENARIOS ?= fanout dm hot idle reconnect
bench:
	@go build -o .local/imbench ./cmd/imbench
	@status=0; for s in $(BENCH_SCENARIOS); do \
		.local/imbench --url $(BENCH_URL) --scenario $$s $(BENCH_FLAGS) || status=1; \
	done; exit $$status

# The table of docs/performance.md: every scenario RUNS times per mode, each run
# on a fresh imd (new schema and Redis prefix, or new data directory), then the
# medians as Markdown (scripts/bench; --help there lists the scenarios):
#   make bench-table RUNS=3 MODES='services embedded' SCENARIOS='fanout dm'
#   make bench-table AGAINST=a2599d3 SCENARIOS=dm   # this tree and a2599d3, runs interleaved
# Results are appended to BENCH_OUT (default .local/bench/<date>.jsonl); BENCH_FLAGS
# and BENCH_FLAGS_<scenario> (e.g. BENCH_FLAGS_idle=--streams=500) add imbench flags.
RUNS ?= 3
MODES ?= services embedded
SCENARIOS ?= fanout fanout_rate dm hot idle reconnect
bench-table:
	scripts/bench --runs '$(RUNS)' --modes '$(MODES)' --scenarios '$(SCENARIOS)' $(if $(BENCH_OUT),--out '$(BENCH_OUT)') $(if $(AGAINST),--against '$(AGAINST)')
