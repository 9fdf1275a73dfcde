#!/usr/bin/env bash
# Installs the Debian packages podtap needs on a Debian 12 node or CI machine (run as root).
# Idempotent: apt is only called when something is missing.
set -euo pipefail

PACKAGES=(
  python3-bpfcc        # bcc's Python module and libbcc (the BPF loader)
  python3-venv         # the project's virtualenv
  linux-headers-amd64  # kernel headers for bcc when the host has none for the running kernel
  containerd runc      # the real container runtime of the end-to-end tests and the demo
  busybox-static       # the rootfs of the test containers
  openssl              # throwaway CA and kubelet certificates of the simulated node (simnode/tls.py)
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
