"""Shared test setup: no network, ever (tiny models are built from config classes)."""

import os
import signal
import subprocess

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Every process group of the tests is on this machine; gloo would otherwise pick its interface by
# resolving the host name, which on some machines names an address that is not theirs (a hang).
# Set before any test starts Ray, so that Ray's workers inherit it.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


@pytest.fixture
def kill_driver_after():
    """A function that runs a sweep driver (a real CLI process in its own session) and kills it,
    process group and all, with SIGKILL once ``finished`` of its ``total`` trials have finished."""

    def run(command: list[str], finished: int, total: int) -> None:
        driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        count, seen = 0, []
        for line in driver.stdout:
            seen.append(line)
            if line.startswith("[") and f"/{total}]" in line:
                count += 1
                if count == finished:
                    os.killpg(driver.pid, signal.SIGKILL)
                    break
        driver.wait(timeout=60)
        assert count == finished, "".join(seen)

    return run
