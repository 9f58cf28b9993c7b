"""The command line: ``craft-search inspect`` on the packaged MiniLM and on tiny local models."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertModel

from search.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    return str(path)


def test_inspect_demo_model_console_script():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(["craft-search", "inspect"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "targets (detected): query, value" in out
    assert out.count("stack 6 x 384 x 384") == 2
    # 6/100/100 on query and value: 2 * (36 + 10000 + 10000)
    assert "6/100/100" in out and "40,072" in out


def test_inspect_json_numbers(tiny_model_dir, capsys):
    assert main(["inspect", tiny_model_dir, "--ranks", "3/8/8,2/4/6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["targets"] == ["query", "value"]
    assert report["adapter_parameters"] == {"3/8/8": 2 * (9 + 64 + 64), "2/4/6": 2 * (4 + 16 + 36)}
    for stack in report["stacks"]:
        assert stack["shape"] == [3, 24, 24]
        kept = stack["energy"]["out"]
        assert kept["24"] == pytest.approx(1.0)
        values = [kept[k] for k in sorted(kept, key=int)]
        assert values == sorted(values)  # more rank keeps more energy
        assert 0.0 < stack["fit"]["2/4/6"] < stack["fit"]["3/8/8"] < 1.0


def test_inspect_explicit_targets(tiny_model_dir, capsys):
    assert main(["inspect", tiny_model_dir, "--targets", "key", "--ranks", "3/8/8"]) == 0
    out = capsys.readouterr().out
    assert "targets (given): key  (n_p = 1)" in out
    assert "3/8/8" in out and "137" in out  # 9 + 64 + 64


@pytest.mark.parametrize(
    "argv, words",
    [
        (["inspect", "/no/such/model"], "cannot load model"),
        (["inspect", "TINY", "--ranks", "4/8/8"], "rank_layers=4"),
        (["inspect", "TINY", "--targets", "nope"], "matches no module"),
    ],
)
def test_inspect_bad_input_is_one_line_and_exit_2(argv, words, tiny_model_dir, capsys):
    argv = [tiny_model_dir if a == "TINY" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("craft-search: error:") and words in err
    assert len(err.splitlines()) == 1


def test_malformed_ranks_flag_exits_2(tiny_model_dir):
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", "inspect", tiny_model_dir, "--ranks", "3x8x8"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert done.returncode == 2
    assert "is not LAYERS/OUT/IN ranks" in done.stderr and "Traceback" not in done.stderr
