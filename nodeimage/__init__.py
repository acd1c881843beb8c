"""``make image``: the node image (``dist/ambient-cni-image.tar``), built offline from Debian packages and the
frozen bundle, with no container daemon and no registry. See docs/image.md."""
