# isconf.py: make demo (try it), make test (the test suite), make bench (figures).
PYTHON ?= python3
VENV   ?= .venv
PYTEST_REQ = pytest==8.3.4 pytest-xdist==3.8.0 prometheus_client==0.26.0

.PHONY: demo test bench clean tools

demo:
	$(PYTHON) tests/demo.py

$(VENV)/.ok: Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check $(PYTEST_REQ)
	touch $@

# The tests use the real tools a sysadmin has; say at once which package is missing.
tools:
	@missing=""; \
	command -v ssh-keygen >/dev/null 2>&1 || missing="$$missing openssh-client"; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v strace >/dev/null 2>&1 || missing="$$missing strace"; \
	command -v qemu-system-x86_64 >/dev/null 2>&1 || missing="$$missing qemu-system-x86"; \
	command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing="$$missing debootstrap"; \
	command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /sbin/mkfs.ext4 ] || missing="$$missing e2fsprogs"; \
	bb=$$(command -v busybox || echo /bin/busybox); \
	case "$$(LC_ALL=C ldd "$$bb" 2>&1)" in *"not a dynamic"*) ;; *) missing="$$missing busybox-static";; esac; \
	if [ -n "$$missing" ]; then \
		echo "make test: missing packages:$$missing"; \
		echo "make test: install them with 'apt-get install -y$$missing' (.ci/run does this), then run make test again"; \
		exit 1; \
	fi

test: tools $(VENV)/.ok
	$(VENV)/bin/python -m pytest -q --durations=15 -n auto --dist loadgroup tests

# make bench's peers figure runs cf-agent, puppet apply and ansible-pull when installed
# (apt-get install cfengine3 puppet-agent ansible git); make test never needs them.
bench: tools $(VENV)/.ok
	$(VENV)/bin/python tests/bench.py

clean:
	rm -rf $(VENV) .pytest_cache tests/__pycache__
