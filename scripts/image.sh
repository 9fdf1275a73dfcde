#!/usr/bin/env bash
# Builds podtap's image with Debian's podman (no Docker engine needed), prints its size, and
# tests it (tests/image: `podtap check` and a byte-exact `podtap tap` in a privileged container).
#
#   scripts/image.sh [all|deps|build|test]      (default: all; `make image` runs it)
#
# Environment:
#   PODTAP_IMAGE        the image to build and test (default localhost/podtap:dev)
#   PODTAP_BASE_IMAGE   the base image; default: Debian bookworm made here with mmdebstrap
#                       (from the Debian mirror apt uses) and `podman import`ed, so that no
#                       container registry is needed. The tarball is cached (IMAGE_CACHE).
#   IMAGE_CACHE         where the base tarball is kept (default /var/cache/podtap-image)
# Run as root (podman's root storage; the tests load BPF programs).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${PODTAP_IMAGE:-localhost/podtap:dev}"
BASE_REF="localhost/podtap-base:bookworm"
CACHE="${IMAGE_CACHE:-/var/cache/podtap-image}"
MIRRORS=(
  "deb http://deb.debian.org/debian bookworm main"
  "deb http://deb.debian.org/debian bookworm-updates main"
  "deb http://deb.debian.org/debian-security bookworm-security main"
)
# What running a container on these machines needs (see ../shared/real-components.md).
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs --events-backend file)
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

log() { echo "image: $*" >&2; }

install_deps() {
  local packages=(podman mmdebstrap runc uidmap) missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

# A bookworm minbase tarball, rebuilt when older than a week (security updates).
base_tarball() {
  local tar="$CACHE/bookworm-minbase.tar"
  if [[ -f "$tar" ]] && [[ -n "$(find "$tar" -mtime -7)" ]]; then
    echo "$tar"
    return
  fi
  mkdir -p "$CACHE"
  log "making the base tarball with mmdebstrap"
  # merged /usr made by mmdebstrap's hook, not by the usrmerge package (which pulls in perl).
  mmdebstrap --quiet --variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$CACHE/bookworm-minbase.tmp.tar" "${MIRRORS[@]}" >&2
  mv "$CACHE/bookworm-minbase.tmp.tar" "$tar"
  echo "$tar"
}

base_image() {
  if [[ -n "${PODTAP_BASE_IMAGE:-}" ]]; then
    echo "$PODTAP_BASE_IMAGE"
    return
  fi
  local tar
  tar="$(base_tarball)"
  # Re-import when the tarball is newer than the imported image.
  local stamp="$CACHE/imported.stamp"
  if ! "${PODMAN[@]}" image exists "$BASE_REF" || [[ "$tar" -nt "$stamp" ]]; then
    log "importing $tar as $BASE_REF"
    "${PODMAN[@]}" import --quiet "$tar" "$BASE_REF" >/dev/null
    touch "$stamp"
  fi
  echo "$BASE_REF"
}

build() {
  local base start end
  base="$(base_image)"
  local ca_args=()
  # The build's pip trusts what this machine trusts (an intercepting proxy's CA, for one);
  # the bundle is mounted for the build only, never copied into the image.
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    ca_args=(--volume /etc/ssl/certs/ca-certificates.crt:/run/build-ca.crt:ro
      --build-arg PIP_CERT=/run/build-ca.crt)
  fi
  log "building $IMAGE from $base"
  start=$(date +%s)
  "${PODMAN[@]}" build --network host "${ULIMITS[@]}" --layers \
    --build-arg BASE="$base" "${ca_args[@]}" -t "$IMAGE" -f Dockerfile . >&2
  end=$(date +%s)
  local size
  size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
  echo "image: $IMAGE built in $((end - start)) s; size $((size / 1000000)) MB ($size bytes)"
  # Dangling layers of earlier builds.
  "${PODMAN[@]}" image prune -f >/dev/null || true
}

run_tests() {
  local py=.venv/bin/python
  [[ -x "$py" ]] || { log ".venv is missing: run make install"; exit 1; }
  PODTAP_IMAGE="$IMAGE" "$py" -m pytest -q tests/image
}

case "${1:-all}" in
  deps) install_deps ;;
  build) install_deps; build ;;
  test) run_tests ;;
  all) install_deps; build; run_tests ;;
  *) echo "usage: $0 [all|deps|build|test]" >&2; exit 2 ;;
esac
