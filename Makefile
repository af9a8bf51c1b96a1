# husk — see README.md. `make demo` boots a microVM; `make test` runs the tests.
SHELL := /bin/bash
.DEFAULT_GOAL := build

CARGO ?= cargo
GUEST_DIR := build/guest
KERNEL := $(GUEST_DIR)/vmlinux
INITRD := $(GUEST_DIR)/initrd.cpio
HOST_TARGET := x86_64-unknown-linux-gnu
# Built with the size-optimised `agent` profile (Cargo.toml says why).
AGENT := target/$(HOST_TARGET)/agent/husk-agent
# A static binary the real-VM tests run inside containers as a hostile
# workload (tests/guest-probe), built like the agent.
GUEST_PROBE := target/$(HOST_TARGET)/agent/husk-probe
VMM := target/release/husk-vmm
SHIM := target/release/containerd-shim-husk-v2
PREFIX ?= /usr/local

# The agent is PID 1 of the guest: a static (static-pie) binary, with
# libseccomp linked in statically (from Debian's libseccomp-dev).
AGENT_RUSTFLAGS := -C target-feature=+crt-static
AGENT_ENV := RUSTFLAGS="$(AGENT_RUSTFLAGS)" LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu
TEST_INITRD := $(GUEST_DIR)/initrd-test.cpio
TEST_EXTRA := $(GUEST_DIR)/test-extra

export HUSK_KERNEL := $(abspath $(KERNEL))
export HUSK_INITRD := $(abspath $(INITRD))
export HUSK_VMM := $(abspath $(VMM))
export HUSK_SHIM_DIR := $(abspath $(dir $(SHIM)))
export HUSK_GUEST_PROBE := $(abspath $(GUEST_PROBE))

.PHONY: setup toolchain build guest guest-test kernel agent initrd probe vmm shim demo install installer-image test test-unit test-vm lint fmt bench bench-boot bench-start bench-density soak fuzz clean

build: guest vmm shim

## The Debian packages the build, the demo and the tests need (idempotent:
## nothing happens when they are all there). `demo` and `test` run it first.
setup:
	scripts/setup-host.sh

## Only the Rust toolchain rust-toolchain.toml pins (no packages, no root):
## every target that runs cargo needs it first.
toolchain:
	scripts/setup-host.sh --toolchain

## Guest image: kernel (cached outside the repo, see scripts/build-kernel.sh) + initramfs.
guest: kernel initrd

kernel:
	scripts/build-kernel.sh $(KERNEL)

agent: | toolchain
	$(AGENT_ENV) $(CARGO) build --profile agent --target $(HOST_TARGET) -p husk-agent

initrd: agent
	scripts/build-initrd.sh $(AGENT) $(INITRD)

## The guest image plus a busybox rootfs at /testdata/busybox in the
## initramfs, for the container tests in tests/tests/agent_vm.rs (until
## virtio-fs brings container rootfses in). initrd.cpio itself stays lean.
guest-test: kernel agent probe | toolchain
	rm -rf $(TEST_EXTRA)
	scripts/busybox-rootfs.sh $(TEST_EXTRA)/testdata/busybox
	scripts/build-initrd.sh $(AGENT) $(TEST_INITRD) $(TEST_EXTRA)

## The hostile-workload probe every test image carries at /bin/husk-probe
## (the demo's and the benchmarks' images too).
probe: | toolchain
	$(AGENT_ENV) $(CARGO) build --profile agent --target $(HOST_TARGET) -p husk-guest-probe

vmm: | toolchain
	$(CARGO) build --release -p husk-vmm

## containerd-shim-husk-v2 and the `husk` admin tool.
shim: | toolchain
	$(CARGO) build --release -p husk-shim

## Start a private containerd, import a small local image and run a container
## in a microVM with `ctr run --runtime io.containerd.husk.v2`.
demo: setup
	$(MAKE) build probe
	$(CARGO) build --release -p husk-tests --bin husk-demo
	@echo "== running a container in a husk microVM"
	target/release/husk-demo

## Install the shim, the tools, the guest image and the default config so a
## stock containerd finds the runtime `io.containerd.husk.v2`.
install: build
	install -D -m 0755 $(SHIM) $(DESTDIR)$(PREFIX)/bin/containerd-shim-husk-v2
	install -D -m 0755 target/release/husk $(DESTDIR)$(PREFIX)/bin/husk
	install -D -m 0755 $(VMM) $(DESTDIR)$(PREFIX)/bin/husk-vmm
	install -D -m 0644 $(KERNEL) $(DESTDIR)$(PREFIX)/share/husk/vmlinux
	install -D -m 0644 $(INITRD) $(DESTDIR)$(PREFIX)/share/husk/initrd.cpio
	install -D -m 0644 configs/husk.toml $(DESTDIR)$(PREFIX)/share/husk/husk.toml

## The Kubernetes node installer's image as an OCI archive,
## build/husk-installer.tar (README.md: Kubernetes). KUBECTL=PATH|auto|none
## picks the kubectl it carries to label nodes.
installer-image: build
	rm -rf build/installer-payload
	$(MAKE) install DESTDIR=$(abspath build/installer-payload) PREFIX=/opt/husk
	scripts/build-installer-image.sh --payload build/installer-payload \
		--out build/husk-installer.tar --kubectl "$${KUBECTL:-auto}"

## Everything: unit tests, then the real-VM tests one at a time.
test: setup
	$(MAKE) guest lint test-unit test-vm

test-unit: | toolchain
	$(CARGO) test --workspace --exclude husk-tests

## Every guest boot is counted (scripts/boot-summary.sh): the suite must fit
## CI's 90 minutes on a host where a boot takes 300 s.
BOOT_LEDGER := $(abspath target/boot-ledger.txt)
BOOT_BUDGET ?= 12
## The suite's templates (one per VM shape, shared by every test's shims):
## made afresh each run, so each shape costs one counted boot.
export HUSK_TEST_TEMPLATES := $(abspath target/husk-templates)
## Two at a time: the CRI pods (their own containerd, network namespace and
## VM shapes) beside everything else, each one test at a time. A guest's
## work is one busy vCPU thread, so on 2 cores the two halves take about as
## long as the longer one; one after the other they did not fit CI's 90
## minutes on a slow host. The CRI half's output follows the rest.
CRI_LOG := $(abspath target/test-vm-cri.log)
test-vm: guest guest-test vmm shim
	rm -f $(BOOT_LEDGER)
	rm -rf $(HUSK_TEST_TEMPLATES)
	$(CARGO) test -p husk-tests --no-run
	export HUSK_BOOT_LEDGER=$(BOOT_LEDGER); \
	( $(CARGO) test -p husk-tests --test cri -- --test-threads=1 >$(CRI_LOG) 2>&1 ) & cri=$$!; \
	$(CARGO) test -p husk-tests -- --test-threads=1 --skip _pods; status=$$?; \
	wait $$cri || status=1; echo "== the CRI tests:"; cat $(CRI_LOG); \
	scripts/boot-summary.sh $(BOOT_LEDGER) $(BOOT_BUDGET) || status=1; exit $$status

lint: | toolchain
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: | toolchain
	$(CARGO) fmt --all

bench: bench-boot bench-start bench-density

## Boot-to-agent-ready: husk-vmm vs qemu microvm, same kernel and initramfs.
bench-boot: build | toolchain
	$(CARGO) build --release -p husk-tests --bin husk-bench
	target/release/husk-bench boot --kernel $(KERNEL) --initrd $(INITRD) \
		--vmm $(VMM) --runs $${RUNS:-5} --out bench/results/boot.json

## Run every fuzz target for FUZZ_SECONDS each (needs cargo-fuzz and nightly),
## one at a time on one core. Each starts from the seeds kept in
## fuzz/corpus/<target>/ (which `make test-unit` also runs) and keeps what it
## finds in fuzz/corpus-work/<target>/ (not in git); crashes go to
## fuzz/artifacts/<target>/.
FUZZ_TARGETS := vsock_queues mmio_registers mmio_lifecycle virtio_fs virtio_net \
	serial vsock_handshake guest_log agent_replies
fuzz:
	cd fuzz && for t in $(FUZZ_TARGETS); do mkdir -p corpus-work/$$t && \
		cargo +nightly fuzz run $$t corpus-work/$$t corpus/$$t -- \
			-jobs=1 -workers=1 -max_total_time=$${FUZZ_SECONDS:-60} || exit 1; done

clean: | toolchain
	$(CARGO) clean
	rm -rf build

## `ctr run --rm` latency, husk vs runc, and the shim's memory per container.
## Churn: $(SOAK_PODS) husk pods made and removed one after another; nothing
## of the host may grow (mounts, cgroups, links, containerd's fds, shim RSS).
SOAK_PODS ?= 10
soak: guest guest-test vmm shim | toolchain
	HUSK_SOAK_PODS=$(SOAK_PODS) $(CARGO) test -p husk-tests --test cri soak_pods -- --ignored --test-threads=1 --nocapture

bench-start: build probe | toolchain
	$(CARGO) build --release -p husk-tests --bin husk-bench
	target/release/husk-bench start --runs $${RUNS:-5} --out bench/results/start.json

## PSS per idle pod, N pods restored from one template (PODS=1,10).
bench-density: build probe | toolchain
	$(CARGO) build --release -p husk-tests --bin husk-bench
	target/release/husk-bench density --pods $${PODS:-1,10} --out bench/results/density.json
