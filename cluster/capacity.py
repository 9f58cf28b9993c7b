"""What a Ray cluster can ever hold: its running nodes, plus the nodes its autoscaler may add.

``ray.cluster_resources()`` counts running nodes only, so on an autoscaling cluster (a head with
no CPUs, workers with ``min_workers: 0``) every request looks too large. :func:`capacity` reads,
from a driver joined to the cluster, each running node's resources (a bundle must fit one node:
they are never summed) and the autoscaler's node types (``resources``, ``max_workers``);
:func:`fit` (pure) says how many bundles the running nodes hold and how many the cluster can
ever hold; :func:`check_capacity` refuses, in one line, only what no node and no node type can
ever hold.

Where the node types come from, first found wins:

1. the cluster config the GCS holds (``ray._private.state.state.get_cluster_config()``; set by
   platforms that report one, None under Ray's v1 autoscaler);
2. the v1 autoscaler's own config file: its monitor writes its pid into the GCS key
   ``__autoscaling_status`` (what ``ray status`` reads), and on the head machine that process's
   command line names ``--autoscaling-config=PATH``. Its status also maps each node it
   launched to its node type, so a running worker is not counted twice;
3. nothing: the cluster is fixed, unless that status names node types other than the
   placeholders Ray gives a fixed cluster's nodes: then it autoscales but its node types cannot
   be read from here (the monitor runs on another machine or in another container, as with
   KubeRay), and nothing is refused.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RunningNode",
    "NodeType",
    "Capacity",
    "Fit",
    "capacity",
    "fit",
    "refusal",
    "check_capacity",
    "can_hold",
    "node_types_from_config",
]

STATUS_KEY = "__autoscaling_status"  # ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS
CONFIG_FLAG = "--autoscaling-config"
EPS = 1e-6  # Ray keeps resources to 1e-4; a quotient within this of an integer is that integer


@dataclass(frozen=True)
class RunningNode:
    """A live node and its total resources (``ray.nodes()``: ``Resources``, not what is free)."""

    node_id: str
    ip: str
    resources: dict[str, float]


@dataclass(frozen=True)
class NodeType:
    """A node type the autoscaler may launch."""

    name: str
    resources: dict[str, float]  # what one node of this type offers
    max_workers: int | None  # nodes of this type at most (None: no limit of its own)


@dataclass
class Capacity:
    """A cluster's running nodes and, when it autoscales, the node types it may add."""

    nodes: list[RunningNode]
    node_types: list[NodeType] | None = None  # None: unknown (see ``autoscales``)
    max_workers: int | None = None  # worker nodes in all, the autoscaler's global cap (None: none)
    node_type_of: dict[str, str] = field(default_factory=dict)  # node id or IP -> the type it was launched as
    autoscales: bool = False  # True with node_types None: it autoscales but its node types are unknown here
    source: str = ""  # where the node types were read

    def type_of(self, node: RunningNode) -> str | None:
        """The node type ``node`` was launched as, if the autoscaler says."""
        return self.node_type_of.get(node.node_id) or self.node_type_of.get(node.ip)


@dataclass(frozen=True)
class Fit:
    """How many copies of ``bundle`` (each on one node) the cluster holds now and can ever hold."""

    bundle: dict[str, float]
    count: int
    now: int  # on the running nodes, all of them idle
    ever: float | None  # with every node type at its max_workers (math.inf: no limit; None: unknown)
    largest: str  # the node or node type that comes closest to holding one bundle, in words
    largest_offer: dict[str, float]  # what it offers of the bundle's resources
    total: dict[str, float]  # the bundle's resources summed over the largest possible cluster
    added: str  # what the autoscaler may add, in words ("" when nothing)

    @property
    def ok(self) -> bool:
        """True unless the cluster can never hold ``count`` bundles."""
        return self.ever is None or self.ever >= self.count

    @property
    def scales_up(self) -> bool:
        """True when the running nodes are too few but the autoscaler may add enough."""
        return self.ok and self.ever is not None and self.now < self.count


def _needed(bundle: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in bundle.items() if v > 0}


def _slots(offer: dict[str, float], bundle: dict[str, float]) -> float:
    """How many ``bundle``s fit on one node offering ``offer`` (math.inf for an empty bundle)."""
    need = _needed(bundle)
    if not need:
        return math.inf
    return min(math.floor(offer.get(k, 0.0) / v + EPS) for k, v in need.items())


def _closeness(offer: dict[str, float], bundle: dict[str, float]) -> tuple[float, float]:
    """How near an offer comes to holding the bundle: the fraction its scarcest resource covers
    (1 or more: it fits), then the mean fraction of every resource (ties: the head has nothing)."""
    need = _needed(bundle)
    shares = [offer.get(k, 0.0) / v for k, v in need.items()]
    return min(shares, default=math.inf), sum(min(x, 1.0) for x in shares) / max(len(shares), 1)


def _effective_types(cap: Capacity) -> list[NodeType]:
    """The node types, a type's ``resources`` left empty filled from a running node of that type."""
    found = []
    for t in cap.node_types or []:
        if not t.resources:
            running = [n.resources for n in cap.nodes if cap.type_of(n) == t.name]
            t = NodeType(t.name, running[0], t.max_workers) if running else t
        found.append(t)
    return found


def fit(cap: Capacity, bundle: dict[str, float], count: int = 1) -> Fit:
    """How many ``bundle``s the cluster ``cap`` holds, on its running nodes and at its largest.

    At its largest the cluster is its running nodes that no node type accounts for (the head,
    nodes joined by hand) plus every node type at its ``max_workers``, the node types with the
    most bundles per node first, within the global ``max_workers``. Running nodes the autoscaler
    launched are instances of their type, counted once. Pure: no Ray.

    Args:
        cap: the running nodes and node types.
        bundle: resources of one bundle, by Ray name (``{"CPU": 1, "GPU": 0.25}``); zeros ignored.
        count: bundles wanted at once.
    """
    need = _needed(bundle)
    now = sum(_slots(n.resources, need) for n in cap.nodes)
    types = [t for t in _effective_types(cap) if t.max_workers is None or t.max_workers > 0]
    names = {t.name for t in types}
    pool = [(n.resources, 1) for n in cap.nodes if cap.type_of(n) not in names]  # (offer, nodes) at its largest
    left = math.inf if cap.max_workers is None else cap.max_workers
    for t in sorted(types, key=lambda t: -_slots(t.resources, need)):  # most bundles per node first
        nodes = min(left, math.inf if t.max_workers is None else t.max_workers)
        left -= nodes
        pool.append((t.resources, nodes))
    ever = sum(nodes * s for offer, nodes in pool if nodes and (s := _slots(offer, need)))
    total = {k: sum(nodes * offer[k] for offer, nodes in pool if nodes and offer.get(k)) for k in need}
    # node types first: on a tie the message names the type, which says what to change
    candidates = [(_closeness(t.resources, need), f"node type {t.name}", t.resources) for t in types]
    candidates += [(_closeness(n.resources, need), "a running node", n.resources) for n in cap.nodes]
    _, largest, offer = max(candidates, key=lambda c: c[0], default=((0.0, 0.0), "a node", {}))
    added = ", ".join(f"{t.name} x {'any' if t.max_workers is None else t.max_workers}" for t in types)
    return Fit(
        bundle=need,
        count=count,
        now=int(now) if math.isfinite(now) else count,
        ever=None if cap.autoscales and cap.node_types is None else ever,
        largest=largest,
        largest_offer={k: offer.get(k, 0.0) for k in need},
        total=total,
        added=added,
    )


def _amounts(resources: dict[str, float]) -> str:
    """``{"CPU": 4, "GPU": 0.5}`` -> ``4 CPUs and 0.5 GPUs``."""
    words = [f"{v:g} {k}{'' if v == 1 or k not in ('CPU', 'GPU') else 's'}" for k, v in resources.items()]
    return " and ".join(words) if words else "nothing"


def refusal(result: Fit, what: str, fix: str) -> str:
    """The one line that says why ``result`` does not fit, for a request described by ``what``."""
    scaling = f"the autoscaler may add {result.added}" if result.added else "the cluster does not autoscale"
    if result.ever == 0:
        return (
            f"{what} needs {_amounts(result.bundle)} on one node, but no node of the Ray cluster can ever hold that: "
            f"the largest, {result.largest}, has {_amounts(result.largest_offer)} ({scaling}); {fix}"
        )
    wanted = {k: v * result.count for k, v in result.bundle.items()}
    return (
        f"{what} needs {_amounts(wanted)}; the Ray cluster has {_amounts(result.total)} at most, "
        f"room for {result.ever:g} of the {result.count} ({scaling}); {fix}"
    )


def _gcs_port(address: str) -> str:
    return address.rpartition(":")[2]


def _monitor_status() -> dict[str, Any]:
    """The v1 autoscaler monitor's latest status (the JSON ``ray status`` reads), or {}."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return {}
    try:
        raw = _internal_kv_get(STATUS_KEY)
        return json.loads(raw) if raw else {}
    except (ValueError, ConnectionError, RuntimeError):
        return {}


def _monitor_config_path(pid: int | None, gcs_address: str) -> Path | None:
    """The ``--autoscaling-config`` file of the monitor ``pid``, when that process runs on this
    machine, is the monitor of the cluster at ``gcs_address`` (same GCS port) and names one."""
    if not isinstance(pid, int):
        return None
    import psutil

    try:
        proc = psutil.Process(pid)
        argv, cwd = proc.cmdline(), proc.cwd()
    except (psutil.Error, OSError):
        return None
    flags = {}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name.startswith("--"):
            flags[name] = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    if _gcs_port(flags.get("--gcs-address", "")) != _gcs_port(gcs_address) or not flags.get(CONFIG_FLAG):
        return None
    path = Path(flags[CONFIG_FLAG]).expanduser()
    path = path if path.is_absolute() else Path(cwd) / path
    return path if path.is_file() else None


def node_types_from_config(config: dict[str, Any]) -> tuple[list[NodeType], int | None]:
    """The worker node types and the global ``max_workers`` of a cluster launcher config.

    Defaults as Ray fills them: a type's ``max_workers`` is the global one; the head type
    launches no workers. A type's ``resources`` missing or empty stays empty (``ray up`` fills
    them in for AWS and GCP before it writes the config the head runs with).
    """
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        raise ValueError("an autoscaler config needs available_node_types (a mapping of node types)")
    top = config.get("max_workers")
    types = []
    for name, body in config["available_node_types"].items():
        if name == config.get("head_node_type"):
            continue
        body = body or {}
        resources = {k: float(v) for k, v in (body.get("resources") or {}).items()}
        types.append(NodeType(name, resources, body.get("max_workers", top)))
    return types, top


def _from_gcs() -> tuple[list[NodeType], None] | None:
    """Node types from the cluster config the GCS holds, if any was reported."""
    import ray

    try:
        config = ray._private.state.state.get_cluster_config()
    except (AttributeError, ConnectionError, RuntimeError):
        return None
    if config is None or not config.node_group_configs:
        return None
    types = [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, None if g.max_count < 0 else g.max_count)
             for g in config.node_group_configs]  # fmt: skip
    return types, None


def _manages_nodes(node_type_of: dict[str, str]) -> bool:
    """True when the monitor's node types are real ones, not the placeholders (``node_<id>``) it
    gives each node of a fixed cluster."""
    from ray.autoscaler._private.util import format_readonly_node_type

    return any(name != format_readonly_node_type(node) for node, name in node_type_of.items())


def capacity() -> Capacity:
    """The running nodes and the autoscaler's node types of the Ray cluster this process joined.

    Raises:
        ValueError: the autoscaler's config file exists but cannot be read as one.
    """
    import ray

    nodes = [RunningNode(n["NodeID"], n.get("NodeManagerAddress", ""), dict(n["Resources"])) for n in ray.nodes() if n["Alive"]]
    status = _monitor_status()
    node_type_of = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    cap = Capacity(nodes, node_type_of=node_type_of)
    from_gcs = _from_gcs()
    if from_gcs is not None:
        cap.node_types, cap.max_workers = from_gcs
        cap.source = "the GCS cluster config"
    elif (path := _monitor_config_path(status.get("monitor_pid"), ray.get_runtime_context().gcs_address)) is not None:
        import yaml

        try:
            cap.node_types, cap.max_workers = node_types_from_config(yaml.safe_load(path.read_text()))
        except (OSError, yaml.YAMLError, ValueError, TypeError) as err:
            raise ValueError(f"cannot read the autoscaler's config {path}: {str(err).splitlines()[0]}") from None
        cap.source = str(path)
    cap.autoscales = any(t.max_workers is None or t.max_workers > 0 for t in cap.node_types or [])
    if cap.node_types is None and _manages_nodes(node_type_of):
        cap.autoscales = True
    return cap


def can_hold(bundle: dict[str, float], count: int = 1, cap: Capacity | None = None) -> bool:
    """Whether the joined Ray cluster can ever hold ``count`` ``bundle``s (unknown counts as yes
    only when the running nodes hold them)."""
    result = fit(cap or capacity(), bundle, count)
    return result.ever >= count if result.ever is not None else result.now >= count


def check_capacity(bundle: dict[str, float], count: int, what: str, fix: str, cap: Capacity | None = None) -> Fit:
    """Refuse, in one line, ``count`` ``bundle``s the joined Ray cluster can never hold.

    A request the running nodes cannot hold yet but the autoscaler's node types can passes, with
    one line on stderr saying the cluster will scale up; so does any request when the cluster
    autoscales but its node types cannot be read from this machine.

    Args:
        bundle: resources of one bundle (a trial, a Ray Train worker), by Ray name.
        count: bundles wanted at once.
        what: the request in words, as the message's subject (``"a trial"``).
        fix: what to do about it, the message's end (``"lower resources.cpu"``).
        cap: the cluster (default: :func:`capacity` of the cluster this process joined).

    Raises:
        ValueError: the cluster can never hold them.
    """
    cap = cap or capacity()
    result = fit(cap, bundle, count)
    if not result.ok:
        raise ValueError(refusal(result, what, fix))
    if result.ever is None and result.now < count:
        print(f"craft-search: the Ray cluster autoscales but its node types cannot be read from this machine "
              f"(run the driver on the head node); not checking that {what} fits", file=sys.stderr)  # fmt: skip
    elif result.scales_up:
        print(f"craft-search: {what} needs {count} x {_amounts(result.bundle)}, the running nodes hold {result.now}; "
              f"the autoscaler will add nodes (up to {result.added})", file=sys.stderr)  # fmt: skip
    return result
