# lustrefs — set-up and developer targets. `make demo` and `make test` install what is missing first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MNT    ?= $(CURDIR)/demo-mnt
SBIN   ?= /sbin
PYTEST_ARGS ?=

.PHONY: demo demo-cluster test deps system-deps lint install bench clean

deps: system-deps $(VENV)/.installed

# System packages: FUSE 3 (fusermount3, /dev/fuse support), what pyfuse3 needs to build from source, and the
# PostgreSQL server (/usr/lib/postgresql/*/bin) that the cluster-mode tests start privately.
system-deps:
	@if ! command -v fusermount3 >/dev/null || ! pkg-config --exists fuse3 2>/dev/null \
	    || ! command -v gcc >/dev/null || ! test -e "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" \
	    || ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
	  echo "Installing system packages: fuse3 libfuse3-dev pkg-config python3-venv"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc >/dev/null; \
	fi
	@if ! ls /usr/lib/postgresql/*/bin/initdb /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 \
	    || ! dpkg-query -W -f='$${Status}' libpq5 2>/dev/null | grep -q 'ok installed'; then \
	  echo "Installing system packages: postgresql libpq5"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    postgresql libpq5 >/dev/null; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: deps
	$(PY) -m lustrefs.demo --mountpoint "$(MNT)"

# Two hosts (two mounts, each with its own LUSTREFS_HOME) of one file system on a private PostgreSQL server.
demo-cluster: deps
	$(PY) -m lustrefs.demo.cluster --mountpoints "$(MNT)-a" "$(MNT)-b"

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check lustrefs tests benchmarks

# Puts the mount(8) helper on the sbin path (`mount -t lustrefs FS_ID /mnt`, fstab lines), the CLI on the PATH,
# and the systemd unit lustrefs@.service (instance = file system id; /etc/lustrefs/<id>.env gives MOUNTPOINT=).
install: deps
	ln -sf $(abspath $(VENV))/bin/mount.lustrefs $(SBIN)/mount.lustrefs
	ln -sf $(abspath $(VENV))/bin/lustrefs /usr/local/bin/lustrefs
	install -d -m 0755 /etc/systemd/system /etc/lustrefs
	install -m 0644 systemd/lustrefs@.service /etc/systemd/system/lustrefs@.service
	install -m 0644 systemd/lustrefs.env.example /etc/lustrefs/lustrefs.env.example

bench: deps
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
