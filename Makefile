# runv-py: `make run` installs everything and runs the main job; `make test` runs every test.
# Both work as root on a fresh Debian 12 machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export RUNV_CACHE ?= /var/cache/runv-py
export RUNV_ASSETS_DIR ?= $(RUNV_CACHE)/assets

DEBIAN_PACKAGES := qemu-system-x86 qemu-utils linux-source-6.1 build-essential bc bison flex \
	libelf-dev libssl-dev debootstrap debian-archive-keyring gpgv erofs-utils busybox-static cpio \
	zstd xz-utils e2fsprogs util-linux libseccomp2 python3 python3-venv python3-dev \
	containerd runc crun podman conmon criu docker-registry skopeo openssl \
	containernetworking-plugins iproute2 iptables nftables procps \
	libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libxml2-utils libvirt-dev pkg-config \
	golang-go golang-github-opencontainers-runtime-tools-dev golang-github-google-uuid-dev docker.io

.PHONY: deps debian-deps venv assets cri-assets run test lint unit vm bench-boot clean

deps: debian-deps venv

debian-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "[deps] apt-get install $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv:
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,libvirt]' -e ./hyperstart-agent

# The image builder installs the guest's wheels with the venv's pip (Debian's python3 has none).
assets: venv
	PYTHON=$(abspath $(PY)) scripts/assets.sh

# crictl, critest and the images they pull, for tests/cri (cached like the guest assets).
cri-assets: deps
	scripts/cri-assets.sh

run: deps assets
	$(VENV)/bin/hyperctl run --rm busybox echo hello

lint: venv
	$(VENV)/bin/ruff check runv_py hyperstart-agent tests bench scripts/gen-proto contrib
	$(VENV)/bin/mypy --strict contrib/gitlab-runner/runv_gitlab_driver.py
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: venv
	$(PY) -m pytest tests/unit -q

vm: deps assets
	$(PY) -m pytest tests/vm -q

test: deps assets cri-assets lint
	$(PY) -m pytest tests -q -rs

bench-boot: deps assets
	$(PY) bench/boot.py

clean:
	rm -rf $(VENV)
