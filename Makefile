# Set-up is part of every target: each installs what is missing (idempotently) and then does its job.
# Needs root on a fresh Debian 12 machine (apt, loop devices, mounts).

VENV     ?= .venv
CACHE    ?= .cache
PY       := $(VENV)/bin/python
PYTEST_ARGS ?= --durations=15
DEMO_SECONDS ?= 60
export MIRRORFS_CACHE := $(abspath $(CACHE))

APT_PACKAGES := python3 python3-venv python3-dev gcc libc6-dev qemu-system-x86 qemu-utils busybox-static fuse3 \
	libfuse3-dev pkg-config e2fsprogs inotify-tools libnbd-bin fdisk gdisk lvm2 xz-utils cpio \
	kmod util-linux sleuthkit redis-server clamav aide tripwire attr acl openssl logrotate less systemd \
	libvirt-daemon-system libvirt-clients libvirt-dev

# Only the benchmarks need these (guestmount, the third view of the mount benchmark; nbdkit, the C target the
# tap cost benchmark compares with); `make test` does not.
BENCH_APT_PACKAGES := libguestfs-tools nbdkit

# Tripwire asks debconf questions on install (site/local keys, rebuilding config and policy): answer them "no"
# first, so the install is non-interactive; the tests make their own keys with twadmin. Idempotent.
TRIPWIRE_PRESEED := tripwire/use-sitekey tripwire/use-localkey tripwire/rebuild-config tripwire/rebuild-policy

.PHONY: all setup apt bench-apt venv images demo test bench lint clean

all: test

setup: apt venv images

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  for q in $(TRIPWIRE_PRESEED); do echo "tripwire $$q boolean false"; done | debconf-set-selections; \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

bench-apt:
	@missing=""; for p in $(BENCH_APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing (benchmarks only):$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | apt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

images: venv
	$(PY) -m images.build all

demo: setup
	$(PY) -m images.demo --seconds $(DEMO_SECONDS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup bench-apt
	$(PY) -m tests.bench.run

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(CACHE)
