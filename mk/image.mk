# The node image: dist/ambient-cni-image.tar, an OCI archive for `ctr -n k8s.io images import`,
# built offline from Debian packages (apt-get download, cached) and the frozen bundle. See docs/image.md.
.PHONY: image image-refresh
IMAGE_TAR := $(DIST)/ambient-cni-image.tar

image: $(IMAGE_TAR)
$(IMAGE_TAR): $(PLUGIN) $(wildcard nodeimage/*.py)
	$(PY) -m nodeimage --bundle $(DIST)/ambient-cni.bundle --out $@

image-refresh: $(PLUGIN)
	$(PY) -m nodeimage --bundle $(DIST)/ambient-cni.bundle --out $(IMAGE_TAR) --refresh

# the image tests and the containerd node-image test need the archive
test: image
bench: image
