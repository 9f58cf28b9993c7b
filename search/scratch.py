"""Each node's scratch space for a sweep's trials: local disk, never shared, cleared on every node.

A trial keeps its training checkpoint and its run outputs in ``<node temp dir>/craft-search/<sweep
key>/<trial id>`` while it writes them (Ray uploads what the trial reports, the trainable copies
``run/`` to the storage). Nodes share no disk, so the sweep clears this directory on every live
node when it ends, for the trials that finished there and for those stopped or failed mid-write.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

__all__ = ["scratch_dir", "clear_scratch", "clear_scratch_everywhere"]


def scratch_dir(key: str) -> Path:
    """The sweep's scratch directory on this node (``key``: the sweep's name and id)."""
    return Path(tempfile.gettempdir()) / "craft-search" / key


def clear_scratch(key: str) -> bool:
    """Remove the sweep's scratch directory on this node; True when there was one."""
    path = scratch_dir(key)
    existed = path.exists()
    shutil.rmtree(path, ignore_errors=True)
    return existed


def clear_scratch_everywhere(key: str, timeout: float = 60.0) -> dict[str, bool]:
    """Run :func:`clear_scratch` on every live Ray node (a zero-CPU task pinned to each).

    Returns:
        node id -> whether that node had scratch files of this sweep. A node that does not answer
        within ``timeout`` seconds, or is lost meanwhile, is left out.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def clear(key: str) -> bool:  # clear_scratch, standing alone: Ray sends a local function by value, so the
        import os  # node's fresh worker imports the standard library only, not this package (torch, transformers:
        import shutil  # seconds per node, at the end of every sweep)
        import tempfile

        path = os.path.join(tempfile.gettempdir(), "craft-search", key)
        existed = os.path.exists(path)
        shutil.rmtree(path, ignore_errors=True)
        return existed

    remote = ray.remote(num_cpus=0, max_retries=0)(clear)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = {node: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(key) for node in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    done = {ref.hex() for ref in ready}
    cleared = {}
    for node, ref in refs.items():
        if ref.hex() in done:
            try:
                cleared[node] = bool(ray.get(ref))
            except ray.exceptions.RayError:  # the node went away meanwhile, and its disk with it
                pass
    return cleared
