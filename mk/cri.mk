# containerd CRI environment. Included by the Makefile.
.PHONY: cri-proto cri-up cri-down test-containerd bench-cri

cri-proto: $(VENV)/.stamp
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. testbed/cri/api.proto

cri-up: build
	$(PY) -m testbed.cri.env up

cri-down:
	$(PY) -m testbed.cri.env down

test-containerd: deps build
	$(PY) -m pytest -m containerd tests/test_containerd_*.py $(PYTEST_ARGS)

bench-cri: deps build
	$(PY) -m bench.cri_sandbox
