"""Classification scores against scikit-learn on fixed inputs; the report writer."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from gemsjax.eval import report, scores

CASES = {
    "binary": ([0, 1, 1, 0, 1, 1, 0, 0, 1, 1], [0, 1, 0, 0, 1, 1, 1, 0, 1, 0], 2),
    "three classes": (
        [0, 1, 2, 2, 1, 0, 2, 1, 0, 2, 2, 1],
        [0, 2, 2, 1, 1, 0, 2, 1, 1, 2, 0, 1],
        3,
    ),
    "class never predicted": ([0, 1, 2, 2, 1, 0], [0, 1, 1, 1, 1, 0], 3),
    "class absent from both": ([0, 1, 1, 0], [0, 1, 0, 0], 3),
    "constant predictor": ([0, 1, 1, 0, 1], [1, 1, 1, 1, 1], 2),
}


@pytest.mark.parametrize("name", CASES)
def test_scores_match_sklearn(name):
    labels, preds, num_classes = CASES[name]
    got = scores.classification_scores(np.array(labels), np.array(preds), num_classes)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert got["macro_f1"] == pytest.approx(
        skm.f1_score(labels, preds, average="macro", zero_division=0)
    )
    assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, preds))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))


def test_confusion_matches_sklearn():
    labels, preds, n = CASES["three classes"]
    np.testing.assert_array_equal(
        scores.confusion(np.array(labels), np.array(preds), n),
        skm.confusion_matrix(labels, preds, labels=range(n)),
    )


def test_mean_std_is_the_sample_std():
    assert scores.mean_std([0.5, 0.7, 0.9]) == pytest.approx((0.7, np.std([0.5, 0.7, 0.9], ddof=1)))
    assert scores.mean_std([0.4]) == (0.4, 0.0)


def test_report_writes_json_markdown_and_prints(tmp_path, capsys):
    rows = [dict(task="t", mcc=(0.5, 0.25), accuracy=0.75, draws=3)]
    text = report.write_report(
        tmp_path,
        "Title",
        rows,
        ["task", "accuracy", "mcc", "draws"],
        notes=["a note"],
        extra=dict(seconds=1.5),
    )
    assert "| t | 0.7500 | 0.5000 ± 0.2500 | 3 |" in text
    assert "- a note" in text
    assert (tmp_path / "results.md").read_text() == text
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["rows"][0]["mcc"] == [0.5, 0.25] and record["seconds"] == 1.5
    assert "| t | 0.7500 | 0.5000 ± 0.2500 | 3 |" in capsys.readouterr().out


def test_plots_are_written(tmp_path):
    report.plot_curves(tmp_path / "c.png", {"a": ([1, 2, 3], [0.7, 0.6, 0.5])}, "loss")
    report.plot_bars(tmp_path / "b.png", ["x", "y"], [0.3, 0.5], [0.1, 0.0], "MCC")
    report.plot_confusion(
        tmp_path / "m.png", np.array([[3, 1, 0], [0, 2, 1], [1, 0, 4]]), ["0", "1", "2"]
    )
    for name in ("c.png", "b.png", "m.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
