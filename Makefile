# banger: the one entry point. `make help` lists the targets; CI runs `make test`.

SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(AGENT_TARGET)/agent/banger-agent
IMAGE_BUILD_DIR := build/image
BUSYBOX_IMAGE_BUILD_DIR := build/image-busybox
# Where bangerd looks for the default image (config `default_image_dir`); the images beside
# it (`busybox`) are used by name.
DEFAULT_IMAGE_DIR ?= /usr/local/share/banger/images/default
BUSYBOX_IMAGE_DIR ?= $(dir $(DEFAULT_IMAGE_DIR))busybox
IMAGE_FILES := vmlinuz initrd.img rootfs.ext4 manifest.txt
BUF := .tools/node_modules/.bin/buf
PYTHON := .tools/venv/bin/python
PROTOS := $(wildcard proto/banger/v1/*.proto)

.PHONY: help setup tools agent image install-image build clients test-images demo test lint fmt bench clean clean-host

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: tools install-image ## Install host packages and tools, build and install the default image (idempotent)

tools: ## Install Debian packages (QEMU from backports), vhost-device-vsock, Firecracker, buf, grpcurl, cargo-deny (each pinned by hash)
	@bash scripts/setup.sh

agent: ## Build the static guest agent
	RUSTFLAGS='-C target-feature=+crt-static --remap-path-prefix=$(CURDIR)=/banger' $(CARGO) build --locked -q -p banger-agent --profile agent --target $(AGENT_TARGET)

# The manifest is the target: the image files carry a fixed mtime (reproducible builds), so
# they always look older than the agent; the manifest is written last, with the build's time.
$(IMAGE_BUILD_DIR)/manifest.txt: $(AGENT_BIN) scripts/build-image.sh
	bash scripts/build-image.sh --cache build/cache --userland debian $(IMAGE_BUILD_DIR) $(AGENT_BIN)

$(BUSYBOX_IMAGE_BUILD_DIR)/manifest.txt: $(AGENT_BIN) scripts/build-image.sh
	bash scripts/build-image.sh --cache build/cache --userland busybox $(BUSYBOX_IMAGE_BUILD_DIR) $(AGENT_BIN)

image: tools agent ## Build the guest images: build/image (the default: Debian bookworm, the agent as init) and build/image-busybox
	@$(MAKE) --no-print-directory $(IMAGE_BUILD_DIR)/manifest.txt $(BUSYBOX_IMAGE_BUILD_DIR)/manifest.txt

install-image: image ## Install the images where bangerd finds them (the default, and `busybox` beside it)
	@for pair in "$(IMAGE_BUILD_DIR):$(DEFAULT_IMAGE_DIR)" "$(BUSYBOX_IMAGE_BUILD_DIR):$(BUSYBOX_IMAGE_DIR)"; do \
		from=$${pair%%:*}; to=$${pair#*:}; \
		if ! cmp -s $$from/manifest.txt $$to/manifest.txt; then \
			install -d -m 0755 $$to && \
			for f in $(IMAGE_FILES); do install -m 0644 $$from/$$f $$to/$$f || exit 1; done && \
			echo "installed $$from in $$to"; \
		fi; \
	done

build: ## Build bangerd and banger
	$(CARGO) build --locked --workspace --bins

clients: tools ## Generate the Python and TypeScript clients from proto/ into clients/*/generated
	rm -rf clients/python/generated && mkdir -p clients/python/generated
	$(PYTHON) -m grpc_tools.protoc -Iproto --python_out=clients/python/generated \
		--grpc_python_out=clients/python/generated $(PROTOS)
	rm -rf clients/typescript/generated
	cd clients/typescript && ../../$(BUF) generate
	cd clients/typescript && node_modules/.bin/tsc -p .

test-images: tools ## Build the root file systems the container-image tests boot (a Debian minbase), once, into build/cache
	@bash scripts/build-test-images.sh build/cache

demo: setup build ## Start bangerd, boot a VM from the default image, run a command in it
	@bash scripts/demo.sh

test: setup build clients test-images ## Run every test: unit, ops, API, end to end with real QEMU guests, generated clients; then what was skipped and why
	@bash scripts/check-self-contained.sh
	CARGO=$(CARGO) bash scripts/test.sh

bench: setup test-images ## Measure a release bangerd against DESIGN §9; writes target/bench/ and docs/PERFORMANCE.md's table
	$(CARGO) build --locked --release --bins -p banger-server -p banger-client -p banger-bench
	target/release/banger-bench target/release $(DEFAULT_IMAGE_DIR) $(CURDIR)

lint: tools ## rustfmt, clippy (-D warnings), cargo deny (licenses, sources, bans), buf lint, buf breaking against the last two commits
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	@# Advisories are not checked: their database cannot be fetched from these hosts.
	$(CARGO) deny --locked --log-level error check bans licenses sources
	cd proto && ../$(BUF) lint
	@# The API never breaks clients silently: what is uncommitted against HEAD, HEAD against HEAD~1.
	@for ref in HEAD HEAD~1; do \
		if git rev-parse -q --verify "$$ref" >/dev/null; then \
			(cd proto && ../$(BUF) breaking --against "../.git#ref=$$ref,subdir=proto") || exit 1; \
		else \
			echo "lint: $$ref is not in this clone (shallow?): buf breaking against it skipped"; \
		fi; \
	done

fmt: ## Format the code
	$(CARGO) fmt --all

clean: ## Remove build outputs (not the installed image)
	$(CARGO) clean
	rm -rf build

clean-host: ## Stop banger's VMs and daemon, remove its state, runtime and memory dirs, default image, cgroups, taps, nft tables, test netns
	@DEFAULT_IMAGE_DIR=$(DEFAULT_IMAGE_DIR) BUSYBOX_IMAGE_DIR=$(BUSYBOX_IMAGE_DIR) bash scripts/clean-host.sh
