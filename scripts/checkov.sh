#!/usr/bin/env bash
# Runs checkov (the Kubernetes policy linter) offline, from its own virtualenv: it pins
# dependencies that clash with the project's, so it does not live in .venv itself.
# Installs it on first use (idempotent).
#
#   scripts/checkov.sh -d deploy/manifests --framework kubernetes -o json
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=3.3.30
VENV=.venv/checkov   # inside .venv: ignored by git, removed by make clean

if ! "$VENV/bin/checkov" --version 2>/dev/null | grep -qx "$VERSION"; then
  echo "checkov.sh: installing checkov==$VERSION into $VENV" >&2
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "checkov==$VERSION" >&2
fi
# Offline: no Prisma Cloud mapping, no policy download.
export BC_SKIP_MAPPING=TRUE
exec "$VENV/bin/checkov" --skip-download "$@"
