# The README's commands. `make test` installs the test dependencies and runs every test.
.PHONY: build test vet bench fuzz
build:
	go build -o bin/ ./cmd/vmlockd ./cmd/vmlock
test:
	./scripts/test.sh
vet:
	go vet ./...
	go run honnef.co/go/tools/cmd/staticcheck ./...
bench: build
	./bin/vmlock bench driver --json
	./bin/vmlock bench daemon --json
	./bin/vmlock bench scale --json
# Every fuzz target in turn, FUZZTIME each (go test runs one -fuzz target at a
# time). `go test ./...` replays their seeds and saved failures (testdata/fuzz).
FUZZTIME ?= 30s
fuzz:
	@for pkg in $$(go list ./...); do \
		for f in $$(go test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
			echo "== $$pkg $$f"; \
			go test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; \
	done
