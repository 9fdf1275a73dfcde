"""Running podtap's image with Debian's podman, as the DaemonSet runs it on a node.

`PODTAP_IMAGE=<ref>` names the image (`make image` builds and sets it). Without it the image
tests skip; with it set but the image missing they skip, or fail when CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence

from tests.kernel import TapRun, require_kernel, unavailable

IMAGE_ENV = "PODTAP_IMAGE"
# What running a container on these machines needs (../shared/real-components.md).
PODMAN = ("podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
          "--events-backend", "file")
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
# The DaemonSet's view of the node: host pids and cgroups, /sys with the host's cgroup fs
# (an explicit mount, else podman's own /sys/fs/cgroup hides it), privileged.
NODE_AGENT = ("--privileged", "--pid", "host", "--cgroupns", "host", "--network", "none",
              "-v", "/sys:/sys", "-v", "/sys/fs/cgroup:/sys/fs/cgroup")
HOST_HEADERS = ("-v", "/lib/modules:/lib/modules:ro", "-v", "/usr/src:/usr/src:ro")


def image_under_test() -> str:
    """The image named by PODTAP_IMAGE; skips (fails with CI=true) if it cannot be run."""
    import pytest

    ref = os.environ.get(IMAGE_ENV)
    if not ref:
        pytest.skip(f"set {IMAGE_ENV}=<image> to test an image (make image does)")
    require_kernel()
    if shutil.which("podman") is None:
        unavailable("podman is not installed (scripts/image.sh deps)")
    exists = subprocess.run([*PODMAN, "image", "exists", ref], capture_output=True, timeout=120)
    if exists.returncode != 0:
        unavailable(f"{IMAGE_ENV}={ref} but there is no such image (build it: make image)")
    return ref


def podman_run(image: str, args: Sequence[str], options: Sequence[str] = (),
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN, "run", "--rm", *ULIMITS, *options, image, *args],
        capture_output=True, text=True, timeout=timeout,
    )


def start_podman_tap(image: str, tap_args: Sequence[str], options: Sequence[str] = (),
                     start_timeout: float = 180) -> TapRun:
    """`podtap tap --format json …` in a container; returns once it says it is tapping.

    SIGINT to the podman process reaches podtap (podman proxies signals), so
    tests.kernel.stop_tap stops it as it stops a tap on the host.
    """
    cmd = [*PODMAN, "run", "--rm", *ULIMITS, *options, image, "tap", "--format", "json",
           *tap_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = TapRun(proc)

    def slurp() -> None:
        assert proc.stdout is not None
        run.stdout = proc.stdout.read()

    run._out_thread = threading.Thread(target=slurp)  # type: ignore[attr-defined]
    run._out_thread.start()  # type: ignore[attr-defined]
    assert proc.stderr is not None
    err = bytearray()
    deadline = time.monotonic() + start_timeout
    while b"podtap: tapping" not in err:
        line = proc.stderr.readline()
        if not line or time.monotonic() > deadline:
            proc.kill()
            proc.wait(30)
            raise AssertionError(f"tap in {image} did not start: {bytes(err).decode()}")
        err += line
    run.stderr = bytes(err)
    return run
