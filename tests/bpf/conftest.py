from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.config import Config
from tests.kernel import LiveProbe, require_kernel


@pytest.fixture(autouse=True)
def _kernel_required() -> None:
    require_kernel()


@pytest.fixture(scope="session")
def live() -> Iterator[LiveProbe]:
    require_kernel()
    probe = LiveProbe(Config())
    try:
        yield probe
    finally:
        probe.close()
