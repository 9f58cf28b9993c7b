"""A sweep's directory in its storage (search.storage) on a local disk and on a real S3 API
(moto on 127.0.0.1), and each node's scratch space (search.scratch)."""

from __future__ import annotations

import pytest

from search.scratch import clear_scratch, scratch_dir
from search.storage import SweepStore, is_uri, resolve_storage


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return SweepStore(str(tmp_path / "sweeps"), "one")
    bucket = request.getfixturevalue("s3")
    return SweepStore(f"s3://{bucket}/{tmp_path.name}/sweeps", "one")


def test_files_and_directories_round_trip(store, tmp_path):
    assert not store.exists() and store.listdir() == []
    store.write_json("sweep.json", {"name": "one", "spec": {"a": [1, 2]}})
    assert store.exists("sweep.json") and store.read_json("sweep.json") == {"name": "one", "spec": {"a": [1, 2]}}
    local = tmp_path / "run"
    (local / "adapter").mkdir(parents=True)
    (local / "config.yaml").write_text("method: craft\n")
    (local / "adapter" / "weights.safetensors").write_bytes(b"\x00\x01\x02")
    store.upload(local, "trial_1/run")
    (local / "config.yaml").write_text("method: lora\n")  # uploaded again: replaced, not appended
    store.upload(local, "trial_1/run")
    assert store.listdir() == ["sweep.json", "trial_1"] and store.listdir("trial_1/run") == ["adapter", "config.yaml"]
    back = store.download("trial_1/run", tmp_path / "back")
    assert (back / "config.yaml").read_text() == "method: lora\n"
    assert (back / "adapter" / "weights.safetensors").read_bytes() == b"\x00\x01\x02"
    with pytest.raises(FileNotFoundError):
        store.read_text("summary.json")
    with pytest.raises(FileNotFoundError):
        store.download("trial_2", tmp_path / "nothing")
    assert store.location("sweep.json") == f"{store.uri}/sweep.json"


def test_locations():
    assert is_uri("s3://b/x") and is_uri("gs://b/x") and not is_uri("runs/sweeps")
    assert resolve_storage("s3://b/x/") == "s3://b/x"
    assert resolve_storage("runs/sweeps").startswith("/") and resolve_storage("runs/sweeps").endswith("/runs/sweeps")


def test_an_unknown_scheme_is_one_line():
    with pytest.raises(ValueError, match=r"^cannot open storage nope://b/x: ") as err:
        SweepStore("nope://b/x", "one")
    assert "\n" not in str(err.value)


def test_scratch_is_per_node_temp_dir_and_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again, as a node's process does
    path = scratch_dir("sweep-1234")
    assert path == tmp_path / "craft-search" / "sweep-1234"
    (path / "trial" / "checkpoint").mkdir(parents=True)
    (scratch_dir("other-5678") / "trial").mkdir(parents=True)
    assert clear_scratch("sweep-1234") and not path.exists() and not clear_scratch("sweep-1234")
    assert scratch_dir("other-5678").exists()  # another sweep's scratch is left alone
