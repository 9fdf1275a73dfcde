# podtap's node agent image: Debian bookworm, Debian's bcc, podtap in a virtualenv, and
# Debian's kernel headers as the fallback for nodes that have none (see agent/capture/headers.py).
#
#   docker build -t podtap .            (or: make image, which also tests the result)
#   docker run --rm --privileged --pid=host -v /sys:/sys -v /lib/modules:/lib/modules:ro \
#       -v /usr/src:/usr/src:ro podtap check
#
# BASE must be Debian bookworm (the same image in every stage: the virtualenv links to its
# /usr/bin/python3). `make image` passes a locally built one (mmdebstrap + podman import).
ARG BASE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------
# Kernel headers, without what their package depends on (gcc, kbuild): bcc only reads the
# header tree. The -common half keeps only this architecture's arch/ directory.
FROM ${BASE} AS headers
ARG DEBIAN_FRONTEND=noninteractive
RUN set -eux; \
    apt-get update; \
    arch="$(dpkg --print-architecture)"; \
    case "$arch" in amd64) karch=x86 ;; arm64) karch=arm64 ;; *) echo "unsupported $arch"; exit 1 ;; esac; \
    flavour="$(apt-cache depends "linux-headers-$arch" | sed -n 's/^ *Depends: \(linux-headers-.*\)$/\1/p' | head -n1)"; \
    common="$(apt-cache depends "$flavour" | sed -n 's/^ *Depends: \(linux-headers-.*-common\)$/\1/p' | head -n1)"; \
    test -n "$flavour" && test -n "$common"; \
    mkdir -p /tmp/debs /out; cd /tmp/debs; \
    apt-get download "$flavour" "$common"; \
    for deb in ./*.deb; do dpkg-deb -x "$deb" /out; done; \
    for d in /out/usr/src/linux-headers-*-common/arch/*; do \
        [ "$(basename "$d")" = "$karch" ] || rm -rf "$d"; \
    done; \
    # scripts/ and tools/ point into linux-kbuild, which is not shipped.
    find /out/usr/src -maxdepth 2 -type l \( -name scripts -o -name tools \) -delete; \
    mkdir -p /out/opt/podtap; \
    mv /out/usr/src /out/opt/podtap/kernel-headers; \
    ls /out/opt/podtap/kernel-headers

# ---------------------------------------------------------------------------------------------
# podtap and its Python dependencies in a virtualenv that also sees Debian's bcc module.
FROM ${BASE} AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv --system-site-packages /opt/podtap/venv
COPY pyproject.toml README.md /src/
COPY agent /src/agent
# PIP_CERT: a CA bundle mounted for the build only (an intercepting proxy); empty = pip's own.
ARG PIP_CERT=""
RUN /opt/podtap/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        ${PIP_CERT:+--cert "$PIP_CERT"} /src \
    # The kubernetes client's asyncio twin (half its 130 MB); podtap uses kubernetes.client.
    && rm -rf /opt/podtap/venv/lib/python3*/site-packages/kubernetes/aio \
    && /opt/podtap/venv/bin/pip uninstall -y --no-cache-dir pip setuptools >/dev/null

# ---------------------------------------------------------------------------------------------
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
# Documentation, manuals and translations are not installed (as in debian:*-slim).
RUN printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
        'path-exclude /usr/share/locale/*' 'path-include /usr/share/locale/locale.alias' \
        > /etc/dpkg/dpkg.cfg.d/podtap-nodoc \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3-bpfcc ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log

COPY --from=headers /out/opt/podtap/kernel-headers /opt/podtap/kernel-headers
# headers.py looks for Debian's header pairs under /usr/src. When the pod mounts the host's
# /usr/src over it, these links are hidden and the bundled copy must be found at its own path.
RUN for d in /opt/podtap/kernel-headers/linux-headers-*; do ln -s "$d" /usr/src/; done
COPY --from=build /opt/podtap/venv /opt/podtap/venv
COPY bpf /opt/podtap/bpf

ENV PATH=/opt/podtap/venv/bin:$PATH \
    PODTAP_BPF_DIR=/opt/podtap/bpf \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN podtap version && python3 -c 'import bcc, orjson, aiohttp, yaml, agent.kube.apiserver'

ENTRYPOINT ["podtap"]
CMD ["run"]
