# podman 4.3 with its CNI backend as a second real runtime. Included by the Makefile.
.PHONY: podman-up podman-down test-podman bench-podman

podman-up: build
	$(PY) -m testbed.podman.env up

podman-down:
	$(PY) -m testbed.podman.env down

test-podman: deps build driver
	$(PY) -m pytest -m podman tests/test_podman_*.py tests/test_plugin_identity.py $(PYTEST_ARGS)

bench-podman: deps build
	$(PY) -m bench.podman_run
