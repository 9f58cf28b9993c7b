"""Which Ray a command joins when given no address: the last ``ray start`` cluster while it is
alive (Ray's rule), a new local one when none was started or it is gone (Ray would retry for ever)."""

from __future__ import annotations

import socket

from cluster.connect import _live_default_address


def _write_last_cluster(tmp_path, monkeypatch, address: str) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir(exist_ok=True)
    (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")


def test_no_cluster_started_means_a_local_one(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _live_default_address() == "local"


def test_a_gone_cluster_means_a_local_one(tmp_path, monkeypatch, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    _write_last_cluster(tmp_path, monkeypatch, f"127.0.0.1:{port}")
    assert _live_default_address() == "local"
    assert f"the last Ray cluster (127.0.0.1:{port}) is gone" in capsys.readouterr().err


def test_a_live_cluster_is_joined_as_ray_would(tmp_path, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        _write_last_cluster(tmp_path, monkeypatch, f"127.0.0.1:{sock.getsockname()[1]}")
        assert _live_default_address() is None


def test_ray_address_in_the_environment_is_left_to_ray(tmp_path, monkeypatch):
    _write_last_cluster(tmp_path, monkeypatch, "127.0.0.1:1")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert _live_default_address() is None
