"""Classification scores from labels and predictions: accuracy, macro-F1, MCC, balanced accuracy.

All are computed from one confusion matrix with numpy and agree with scikit-learn's
``accuracy_score``, ``f1_score(average="macro")``, ``matthews_corrcoef`` and
``balanced_accuracy_score`` (``tests/test_eval_scores.py`` checks this on fixed inputs): a class
absent from both labels and predictions is left out of the macro average, as scikit-learn does
when it is given no ``labels=``; an undefined F1 or MCC (zero denominator) counts as 0.
"""

from __future__ import annotations

import numpy as np

SCORES = ("accuracy", "macro_f1", "mcc", "balanced_accuracy")


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``int64[C, C]``: row = true class, column = predicted class."""
    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def scores_from_confusion(matrix: np.ndarray) -> dict[str, float]:
    """:data:`SCORES` of a confusion matrix ``int[C, C]`` (rows true, columns predicted)."""
    m = np.asarray(matrix, np.float64)
    total, correct = m.sum(), np.trace(m)
    true_count, pred_count = m.sum(axis=1), m.sum(axis=0)
    present = (true_count + pred_count) > 0
    f1_denominator = true_count + pred_count
    f1 = np.divide(
        2 * np.diag(m), f1_denominator, out=np.zeros_like(f1_denominator), where=f1_denominator > 0
    )
    recall = np.divide(np.diag(m), true_count, out=np.zeros_like(true_count), where=true_count > 0)
    # Gorodkin's multi-class MCC, the form scikit-learn computes.
    cov_tp = correct * total - pred_count @ true_count
    cov_pp = total**2 - pred_count @ pred_count
    cov_tt = total**2 - true_count @ true_count
    mcc = cov_tp / np.sqrt(cov_pp * cov_tt) if cov_pp * cov_tt > 0 else 0.0
    return dict(
        accuracy=float(correct / total) if total else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        mcc=float(mcc),
        balanced_accuracy=float(recall[true_count > 0].mean()) if total else 0.0,
    )


def classification_scores(
    labels: np.ndarray, preds: np.ndarray, num_classes: int
) -> dict[str, float]:
    """:data:`SCORES` of ``preds`` against ``labels`` (both ``int[N]`` in ``[0, num_classes)``)."""
    return scores_from_confusion(confusion(labels, preds, num_classes))


def mean_std(values: list[float]) -> tuple[float, float]:
    """``(mean, std)`` over draws; std is the sample standard deviation (ddof 1; 0 for one)."""
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0
