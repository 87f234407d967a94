# Thin aliases; scripts/test and scripts/run are the real entry points.
.PHONY: test run generate lint

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
