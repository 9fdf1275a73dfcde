"""Fixtures shared by the unit tests of the HTTPS clients (kubelet, API server, discovery).

A module sets `TOKEN` (the bearer token its fake server accepts) and may set
`TLS_NAME` (the server certificate's subject name).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from simnode.tls import TLSFiles, generate_tls


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1, once per test module."""
    name = getattr(request.module, "TLS_NAME", "podtap-test")
    return generate_tls(tmp_path_factory.mktemp("tls"), name=name)


@pytest.fixture
def token_file(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """The module's TOKEN in a file, as the service-account volume holds it."""
    path = tmp_path / "token"
    path.write_text(request.module.TOKEN + "\n")
    return path
