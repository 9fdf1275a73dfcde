#!/usr/bin/env bash
# Installs what `make bench` needs beyond `make install` (run as root on Debian 12).
# Idempotent: apt is only called when something is missing.
#   - matplotlib (Debian's python3-matplotlib: the venv sees system site packages) for the plots;
#   - the peer shippers of the benchmark page: rsyslog with omelasticsearch, installed as packages,
#     and syslog-ng with its http() module, unpacked with `dpkg -x` under SYSLOG_NG_ROOT because
#     syslog-ng-core conflicts with rsyslog as a package. Neither is started as a service;
#   - py-spy (from PyPI, into the venv) for the page's profile of the agent's CPU.
set -euo pipefail

SYSLOG_NG_ROOT=${SYSLOG_NG_ROOT:-/opt/podtap-bench/syslog-ng}
VENV=${VENV:-.venv}
PY_SPY=py-spy==0.4.3

PACKAGES=(
  python3-matplotlib     # the PNG plots of docs/benchmarks.md
  rsyslog                # peer: imfile tails the CRI files
  rsyslog-elasticsearch  # peer: omelasticsearch into the loopback _bulk sink
  libivykis0 libnet1 libwrap0 libpcre3 libcurl4  # the libraries of the unpacked syslog-ng
  gcc                    # the benchmarks' C writers
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-bench-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [[ ! -x "$SYSLOG_NG_ROOT/usr/sbin/syslog-ng" || ! -e "$SYSLOG_NG_ROOT/usr/lib/syslog-ng/3.38/libhttp.so" ]]; then
  echo "install-bench-deps: unpacking syslog-ng into $SYSLOG_NG_ROOT"
  work=$(mktemp -d)
  chmod 755 "$work"  # apt-get download runs as _apt
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download -qq syslog-ng-core syslog-ng-mod-http syslog-ng-scl)
  mkdir -p "$SYSLOG_NG_ROOT"
  for deb in "$work"/*.deb; do
    dpkg -x "$deb" "$SYSLOG_NG_ROOT"
  done
fi
if [[ ! -x "$VENV/bin/py-spy" ]]; then
  echo "install-bench-deps: installing $PY_SPY into $VENV"
  "$VENV/bin/python" -m pip install -q "$PY_SPY"
fi
echo "install-bench-deps: ok (syslog-ng in $SYSLOG_NG_ROOT, py-spy in $VENV)"
