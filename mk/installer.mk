# The companion installer (conflist/): its tests and its benchmark.
.PHONY: test-installer bench-installer

test-installer:
	$(PY) -m pytest tests/test_installer_golden.py tests/test_installer_units.py tests/test_installer_watch.py \
		tests/test_installer_runtime.py tests/test_installer_crash.py -q

bench-installer:
	$(PY) -m bench.installer_repair
