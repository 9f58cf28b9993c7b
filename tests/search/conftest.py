"""Shared fixtures of the search tests: a real MLflow tracking server and a real S3 API (moto) on
127.0.0.1, tiny models and data, and a check of a sweep's Optuna study."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend, in its own process group; it
    can be stopped and started again on the same port and database (an outage)."""

    def __init__(self, root):
        self.root = root
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = None

    def start(self, timeout: float = 120) -> MlflowServer:
        """Start it and wait until ``/health`` answers."""
        self.log = open(self.root / "server.log", "a")  # noqa: SIM115 - closed by stop()
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers: tracking only
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL after 30 s)."""
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` with a SQLite backend, bound to loopback; stopped (whole process
    group) at the end of the session. Yields its URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def restartable_mlflow(tmp_path_factory):
    """A started :class:`MlflowServer` of this test's own, which the test may stop and start."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-restartable")).start()
    try:
        yield server
    finally:
        server.stop()


WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "plot", "and", "acting"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny BERT sequence classifier and its WordPiece tokenizer, saved like a hub model."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-classifier")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.1,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Separable reviews: the label is the majority of positive / negative words."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        strong = ["good", "great", "fine"] if label == "pos" else ["bad", "awful", "poor"]
        weak = ["bad", "awful", "poor"] if label == "pos" else ["good", "great", "fine"]
        words = rng.choices(strong, k=3) + rng.choices(weak, k=1) + rng.choices(["the", "movie", "was", "plot", "and"], k=3)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path, rows, header=("text", "label")) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def check_study():
    """A function checking that the Optuna study at ``url`` holds every trial of a finished
    sweep's ``summary`` in its true state (COMPLETE with the trial's score and size, PRUNED,
    FAIL) and nothing RUNNING. A Ray trial may have several records: what a killed driver told
    (its ending lost with the driver's state), then the ending of the resumed sweep; the latest is
    the trial's state. A trial sampled by a killed driver and never run again ends FAIL."""
    import optuna
    from optuna.trial import TrialState

    from search.searcher import RAY_TRIAL_ATTR, STUDY_NAME, SUPERSEDES_ATTR

    states = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}

    def check(url: str, summary: dict) -> optuna.Study:
        study = optuna.load_study(study_name=STUDY_NAME, storage=url)
        assert not study.get_trials(states=(TrialState.RUNNING,))
        by_ray: dict[str, list] = {}
        for trial in sorted(study.trials, key=lambda t: t.number):
            by_ray.setdefault(trial.user_attrs[RAY_TRIAL_ATTR], []).append(trial)
        for records in by_ray.values():  # each later record names the one it supersedes
            assert [t.user_attrs.get(SUPERSEDES_ATTR) for t in records[1:]] == [t.number for t in records[:-1]]
        for trial in summary["trials"]:
            latest = by_ray.pop(trial["trial_id"])[-1]
            assert latest.state == states[trial["outcome"]], (trial["trial_id"], trial["outcome"], latest.state)
            if trial["outcome"] == "complete":
                assert latest.values == pytest.approx([trial["score"], trial["adapter_parameters"]])
        # Left: trials only a killed driver knew (their Ray trials were not in its last snapshot).
        assert all(records[-1].state.is_finished() for records in by_ray.values())
        return study

    return check


BUCKET = "craft-test"  # the bucket the s3 fixture creates


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket (its name is the fixture's value); the
    environment points every S3 client of this process and its children (Ray's workers started
    afterwards, CLI drivers) at it."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(BUCKET)
    yield BUCKET
    server.stop()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
