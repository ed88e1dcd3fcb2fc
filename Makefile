# Developer workflows. `make demo` runs the main job, `make test` everything CI runs.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: demo inventory-demo lab-test test test-deps lint unit bench build release fuzz install images deb clean

## demo: the QEMU lab's failover, narrated: two compute nodes installed over PXE by the
## provisioner (embedded SQLite), node-a cut off, fenced, its HA instances recovered on node-b
demo:
	./scripts/demo.sh

## inventory-demo: the quick one (no QEMU): migrate an embedded SQLite database, load a fleet
inventory-demo:
	./scripts/demo-inventory.sh

## lab-test: the QEMU lab's scenarios (failover, db-down-at-boot, provisioner-outage, power-loss, drain) as tests; ~55 min
lab-test:
	./scripts/lab-test.sh

## test: install what the tests need (apt, PostgreSQL), then fmt, clippy and every test
test:
	./scripts/test.sh

## bench: the benchmarks with their figures (see docs/performance.md)
bench:
	./scripts/bench.sh

## fuzz: every parser's fuzz target for FUZZ_SECONDS (default 60) each
fuzz:
	./scripts/fuzz.sh

## images: the deploy ramdisk (images/deploy/out) and the node image (images/node/out); cached
images:
	./images/deploy/build.sh
	./images/node/build.sh

## install: binaries to /usr/bin, units to /usr/lib/systemd/system, iPXE into the TFTP root
PREFIX ?= /usr
TFTP_ROOT ?= /var/lib/nodekeeper/tftp
install: release
	install -m 0755 target/release/nodekeeper-guard target/release/nodekeeper-provisioner $(DESTDIR)$(PREFIX)/bin/
	install -d $(DESTDIR)/usr/lib/systemd/system
	install -m 0644 systemd/*.service $(DESTDIR)/usr/lib/systemd/system/
	./scripts/install-tftp-root.sh $(DESTDIR)$(TFTP_ROOT)

## deb: Debian packages of the provisioner and the guard into target/deb (scripts/make-deb.sh)
deb:
	./scripts/make-deb.sh

build:
	cargo build --workspace --all-targets

release:
	cargo build --release --workspace

clean:
	cargo clean
	rm -rf .demo .bench
