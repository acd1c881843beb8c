#!/usr/bin/env bash
# Installs what building, the demo and the tests need on a fresh Debian 12 machine (run as root).
# Idempotent: packages already present are not reinstalled.
set -euo pipefail
APT_PACKAGES=(
  containernetworking-plugins   # /usr/lib/cni: bridge, host-local, portmap, tuning, loopback
  golang-go golang-github-appc-cni-dev   # the libcni test driver, built offline
  iptables iproute2 procps psmisc
  containerd runc               # the real runtime tests
  podman                        # the second real runtime (4.3, CNI backend); tests configure it through CONTAINERS_CONF
  hyperfine                     # benchmarks
  build-essential               # static pause binary (containerd tests)
  python3-venv libpython3.11    # the project venv; PyInstaller needs the shared libpython
  util-linux                    # nsenter
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# deploy/ tests run the real kubectl (client only); Debian's kubernetes-client provides one when none is installed
if ! command -v kubectl >/dev/null; then
  echo "install-deps: apt-get install kubernetes-client" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi
