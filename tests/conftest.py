"""Shared test setup: no network, ever (tiny models are built from config classes); nothing written
into the working tree (checked at the end of the session)."""

import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_CACHES = ("__pycache__", ".pytest_cache", ".ruff_cache", ".egg-info")  # what running Python writes anyway

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


def _tree_changes() -> set[str] | None:
    """The working tree's changed, untracked and ignored paths (git's short format), or None
    outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line for line in out.splitlines() if not any(cache in line for cache in _CACHES)}


def pytest_sessionstart(session):
    session.config.stash[_TREE] = _tree_changes()


def pytest_sessionfinish(session, exitstatus):
    """Fail the session when a test (or a command it ran) wrote into the working tree: tests write
    under pytest's temporary paths only."""
    before = session.config.stash.get(_TREE, None)
    after = _tree_changes()
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:
        print(f"\nthe tests wrote into the working tree {ROOT}: {', '.join(new)}; write under tmp_path instead")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_TREE = pytest.StashKey[set]()
