"""A multi-node Ray cluster and an MLflow tracking server on 127.0.0.1, started and stopped by id.

``up`` starts a Ray head (``ray start --head``, no CPUs by default: it coordinates) and N worker
nodes (``ray start --address``, each with its own CPU count), every one a separate ``ray start
--block`` process in its own session, plus ``mlflow server`` with a SQLite store; it waits until
every node has joined and the server answers, and records each process (pid and start time) in
``STATE_DIR/cluster.json``. ``down`` stops exactly those processes and the processes below them,
nothing else. Each worker node gets a temporary directory of its own (``STATE_DIR/nodes/worker-N``,
its ``TMPDIR``): like cloud nodes, the nodes share no scratch disk, only the sweep's storage.

Drivers join at ``127.0.0.1:PORT`` and the MLflow server listens on 127.0.0.1 only. Ray itself
never advertises loopback: its nodes reach each other on the machine's own IP, so the cluster
runs with Ray's token authentication (``RAY_AUTH_MODE=token``; the token is
``~/.ray/auth_token``, which drivers on this machine find): nothing else on the network can
join it or run code on it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .connect import last_cluster_note, use_token_if_available
from .processes import Started, is_running, spawn, stop

__all__ = ["DEFAULT_STATE_DIR", "STATE_FILE", "LocalCluster", "up", "down", "read_state", "stop_node"]

DEFAULT_STATE_DIR = "runs/cluster"
STATE_FILE = "cluster.json"
ROLE_RESOURCE = "craft-node:"  # a custom resource per node naming its role
RAY_ENV = {
    "RAY_AUTH_MODE": "token",  # its ports are on the machine's IP: only holders of the token get in
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass
class LocalCluster:
    """A started local cluster: addresses and the processes that are it."""

    ray_address: str  # HOST:PORT of the head's GCS (craft-search sweep --address)
    mlflow_uri: str | None  # http://127.0.0.1:PORT
    state_dir: str
    processes: list[Started] = field(default_factory=list)
    nodes: dict[str, str] = field(default_factory=dict)  # role -> Ray node id
    created: str = ""

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        data["processes"] = [p.to_dict() for p in self.processes]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LocalCluster:
        return cls(**{**data, "processes": [Started.from_dict(p) for p in data["processes"]]})

    def running(self) -> list[Started]:
        """The cluster's processes still running."""
        return [p for p in self.processes if is_running(p.pid, p.started)]

    def process(self, role: str) -> Started:
        """The process of ``role`` (head, worker-1, ..., mlflow)."""
        for p in self.processes:
            if p.role == role:
                return p
        raise ValueError(f"no process {role!r} in this cluster; it has {[p.role for p in self.processes]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_cli() -> str:
    script = Path(sys.executable).with_name("ray")
    return str(script) if script.is_file() else "ray"


def read_state(state_dir: str | Path = DEFAULT_STATE_DIR) -> LocalCluster | None:
    """The cluster recorded in ``state_dir``, or None."""
    path = Path(state_dir) / STATE_FILE
    return LocalCluster.from_dict(json.loads(path.read_text())) if path.is_file() else None


def _write_state(cluster: LocalCluster) -> None:
    path = Path(cluster.state_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(cluster.to_dict(), indent=2) + "\n")
    tmp.replace(path)


class _Watcher:
    """A short-lived driver on the new cluster that waits for nodes to join."""

    def __init__(self, address: str):
        import ray

        use_token_if_available()  # the nodes were started with RAY_AUTH_MODE=token
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)

    def wait_for(self, count: int, newest: Started | None, timeout: float) -> dict[str, str]:
        """Ray node id per role once ``count`` nodes are alive; fails early when ``newest`` exits."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            alive = [n for n in ray.nodes() if n["Alive"]]
            if len(alive) >= count:
                return {
                    key.removeprefix(ROLE_RESOURCE): n["NodeID"]
                    for n in alive
                    for key in n["Resources"]
                    if key.startswith(ROLE_RESOURCE)
                }
            if newest is not None and not is_running(newest.pid, newest.started):
                raise _NodeExited(newest)
            if time.monotonic() > deadline:
                raise ValueError(
                    f"only {len(alive)} of {count} Ray nodes joined in {timeout:.0f} s; see the logs in {Path(newest.log).parent if newest else '.'}"
                )
            time.sleep(0.5)

    def close(self) -> None:
        import ray

        ray.shutdown()


class _NodeExited(ValueError):
    """A process of the cluster exited while starting."""

    def __init__(self, node: Started):
        super().__init__(f"{node.role} exited while starting; see {node.log}")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def _wait_until(ready, proc: Started, what: str, timeout: float) -> None:
    """Poll ``ready()`` until true; fail in one line when ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not is_running(proc.pid, proc.started):
            raise _NodeExited(proc)
        if time.monotonic() > deadline:
            raise ValueError(f"{proc.role} did not {what} in {timeout:.0f} s; see {proc.log}")
        time.sleep(0.3)


def _ensure_token(env: dict[str, str], log: Path) -> None:
    """Make sure Ray's token exists (``ray get-auth-token --generate`` writes ``~/.ray/auth_token``
    on a machine that has none; an existing token, file or ``RAY_AUTH_TOKEN``, is kept)."""
    done = subprocess.run([_ray_cli(), "get-auth-token", "--generate"], capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:  # stdout holds the token: never shown
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(done.stderr)
        raise ValueError(f"cannot find or create Ray's authentication token; see {log}")


def _node_command(role: str, head: str | None, port: int | None, cpus: float, object_store_mb: int) -> list[str]:
    marker = json.dumps({ROLE_RESOURCE + role: 1})  # tells the nodes apart in ray.nodes()
    common = [f"--num-cpus={cpus:g}", "--num-gpus=0", f"--resources={marker}",
              f"--object-store-memory={object_store_mb * 1024 * 1024}", "--disable-usage-stats", "--block"]  # fmt: skip
    if head is None:
        return [_ray_cli(), "start", "--head", f"--port={port}", "--include-dashboard=false", *common]
    return [_ray_cli(), "start", f"--address={head}", *common]


def up(
    workers: int = 2,
    *,
    worker_cpus: float = 1.0,
    head_cpus: float = 0.0,
    state_dir: str | Path = DEFAULT_STATE_DIR,
    mlflow: bool = True,
    object_store_mb: int = 256,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> LocalCluster:
    """Start a head, ``workers`` worker nodes and (``mlflow``) a tracking server on 127.0.0.1.

    Args:
        workers: worker nodes, each a separate ``ray start`` process with ``worker_cpus`` CPUs.
        head_cpus: CPUs the head offers to trials (0: it only coordinates).
        state_dir: where ``cluster.json``, the logs and the MLflow store go.
        mlflow: also start ``mlflow server`` (SQLite store and artifacts in ``state_dir``).
        object_store_mb: each node's object store.
        timeout: seconds to wait for every node and the server.
        env: extra environment of every Ray node (e.g. Ray's health-check settings).

    Raises:
        ValueError: a cluster is already up in ``state_dir``, bad counts, or a process that
            did not start (everything started is stopped again).
    """
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if worker_cpus <= 0 or head_cpus < 0:
        raise ValueError("--worker-cpus must be positive and --head-cpus at least 0")
    state_dir = Path(state_dir).resolve()
    existing = read_state(state_dir)
    if existing is not None and existing.running():
        raise ValueError(
            f"a cluster is already up (Ray at {existing.ray_address}, state in {state_dir}); "
            "run craft-search cluster down first, or pass another --state-dir"
        )
    logs = state_dir / "logs"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    cluster = LocalCluster(address, None, str(state_dir), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    node_env = {**RAY_ENV, **(env or {})}
    try:
        _ensure_token(node_env, logs / "token.log")
        head = spawn("head", _node_command("head", None, port, head_cpus, object_store_mb), logs / "head.log", node_env)
        cluster.processes.append(head)
        _write_state(cluster)  # recorded at once: a failed start is still stopped by down
        _wait_until(lambda: _port_open(port), head, f"listen on 127.0.0.1:{port}", timeout)
        if mlflow:  # starts while the nodes join
            mlflow_port = _free_port()
            cluster.mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
            command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                       "--workers", "1", "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
                       "--artifacts-destination", str(state_dir / "mlartifacts")]  # fmt: skip
            # tracking only: MLflow's job workers (eight more processes, for its GenAI jobs) stay off
            cluster.processes.append(spawn("mlflow", command, logs / "mlflow.log", {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}))
            _write_state(cluster)
        watcher = _Watcher(address)
        try:
            cluster.nodes = watcher.wait_for(1, head, timeout)
            for i in range(1, workers + 1):  # one at a time: nodes starting together may race for a port
                cluster.nodes = _start_worker(cluster, watcher, i, worker_cpus, object_store_mb, node_env, timeout)
        finally:
            watcher.close()
        if mlflow:
            _wait_until(
                lambda: _healthy(cluster.mlflow_uri), cluster.process("mlflow"), f"answer at {cluster.mlflow_uri}", timeout
            )
        _write_state(cluster)
    except BaseException:
        stop(cluster.processes)
        _forget_current_cluster(address)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        raise
    return cluster


def _start_worker(
    cluster: LocalCluster, watcher: _Watcher, i: int, cpus: float, object_store_mb: int, env: dict[str, str], timeout: float
) -> dict[str, str]:
    """Start worker node ``i`` and wait until it has joined; a node that exits while starting
    (its raylet lost a port to another process, or Ray's start-up timeout on a busy machine) is
    started once more."""
    role = f"worker-{i}"
    command = _node_command(role, cluster.ray_address, None, cpus, object_store_mb)
    log = Path(cluster.state_dir) / "logs" / f"{role}.log"
    env = {**env, **_own_temp_dir(Path(cluster.state_dir) / "nodes" / role)}
    failure: _NodeExited | None = None
    for _ in range(2):
        node = spawn(role, command, log, env)
        cluster.processes.append(node)
        _write_state(cluster)
        try:
            return watcher.wait_for(i + 1, node, timeout)
        except _NodeExited as err:
            stop([node], grace=0.0)  # and whatever it left behind
            cluster.processes.remove(node)
            _write_state(cluster)
            failure = err
    raise ValueError(f"{failure} (started twice)")


def _own_temp_dir(path: Path) -> dict[str, str]:
    """A worker node's environment for a temporary directory of its own, as a cloud node has
    (nodes share no scratch disk): ``TMPDIR`` for the trials' files; Ray's own session files stay
    where the head keeps them (``RAY_TMPDIR``)."""
    from ray._common.utils import get_default_system_temp_dir

    path.mkdir(parents=True, exist_ok=True)
    return {"TMPDIR": str(path), "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", get_default_system_temp_dir())}


def _forget_current_cluster(address: str) -> None:
    """Remove Ray's note of the last cluster when it names this one (as ``ray stop`` does), so a
    later plain ``ray.init()`` does not try to join a stopped cluster. Ray writes the head's port
    with the machine's own IP (it never advertises 127.0.0.1), so the port identifies it."""
    note = last_cluster_note()
    try:
        if note.read_text().strip().rpartition(":")[2] == address.rpartition(":")[2]:
            note.unlink()
    except OSError:
        pass


def stop_node(cluster: LocalCluster, role: str) -> list[int]:
    """Stop one node (or the server) of ``cluster`` by id, as a lost machine would vanish: SIGKILL.

    Returns:
        The pids stopped.
    """
    return stop([cluster.process(role)], grace=0.0)


def down(state_dir: str | Path = DEFAULT_STATE_DIR) -> tuple[LocalCluster, list[int]]:
    """Stop every process of the cluster recorded in ``state_dir``, and nothing else.

    Returns:
        The cluster and the pids stopped (its processes and every process below them).

    Raises:
        ValueError: no cluster recorded there.
    """
    state_dir = Path(state_dir).resolve()
    cluster = read_state(state_dir)
    if cluster is None:
        raise ValueError(f"no cluster recorded in {state_dir} (no {STATE_FILE}); nothing to stop")
    stopped = stop(cluster.processes)
    _forget_current_cluster(cluster.ray_address)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return cluster, stopped
