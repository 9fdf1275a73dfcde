"""Throwaway certificates for the loopback kubelet: a CA and a server cert for 127.0.0.1.

Uses the `openssl` command line tool (Debian's `openssl` package, a dependency of
ca-certificates). Keys are EC P-256 so generation takes milliseconds.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_VALID_DAYS = "2"

_CA_EXTENSIONS = """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class TLSFiles:
    """Paths of one generated CA and the server certificate it signed."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


class OpenSSLMissingError(RuntimeError):
    """The `openssl` binary is not installed."""


def generate_tls(directory: str | Path | None = None, *, name: str = "podtap-test") -> TLSFiles:
    """Create a CA and a server certificate (SAN IP:127.0.0.1, DNS:localhost) in `directory`.

    With no directory a new temporary one is made; the caller removes it when done.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise OpenSSLMissingError("the openssl CLI is needed to make test certificates")
    out = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="podtap-tls-"))
    out.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(
        directory=out,
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.crt",
        server_key=out / "server.key",
    )
    _make_ca(openssl, files, name)
    _make_server_cert(openssl, files, name)
    return files


def _make_ca(openssl: str, files: TLSFiles, name: str) -> None:
    ext = files.directory / "ca.ext"
    ext.write_text(_CA_EXTENSIONS)
    _make_key(openssl, files.ca_key)
    csr = files.directory / "ca.csr"
    _run(openssl, "req", "-new", "-key", files.ca_key, "-subj", f"/CN={name}-ca", "-out", csr)
    _run(
        openssl,
        "x509",
        "-req",
        "-in",
        csr,
        "-signkey",
        files.ca_key,
        "-days",
        _VALID_DAYS,
        "-extfile",
        ext,
        "-out",
        files.ca_cert,
    )


def _make_server_cert(openssl: str, files: TLSFiles, name: str) -> None:
    ext = files.directory / "server.ext"
    ext.write_text(_SERVER_EXTENSIONS)
    _make_key(openssl, files.server_key)
    csr = files.directory / "server.csr"
    _run(
        openssl,
        "req",
        "-new",
        "-key",
        files.server_key,
        "-subj",
        f"/CN={name}-kubelet",
        "-out",
        csr,
    )
    _run(
        openssl,
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        files.ca_cert,
        "-CAkey",
        files.ca_key,
        "-CAcreateserial",
        "-days",
        _VALID_DAYS,
        "-extfile",
        ext,
        "-out",
        files.server_cert,
    )


def _make_key(openssl: str, path: Path) -> None:
    _run(
        openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path
    )
    path.chmod(0o600)


def _run(*argv: str | Path) -> None:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=False, timeout=30
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl failed ({done.returncode}): {done.stderr.strip()[:500]}")
