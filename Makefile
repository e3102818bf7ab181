# The README's commands. `make test` installs the test dependencies and runs every test.
.PHONY: build test vet bench
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
