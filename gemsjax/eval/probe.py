"""Linear probe on frozen embeddings: closed-world species accuracy.

BarcodeBERT's ``baselines/linear_probing.py`` recipe, with scikit-learn doing the fit: features
standardized by one global scalar mean and standard deviation of the training features (as there),
then a multinomial logistic regression (L-BFGS, L2 ``C=1``) instead of 200 epochs of SGD on a
linear layer: the same model class, fitted towards convergence (at most ``max_iter`` L-BFGS
iterations; a fit stopped there is used as it is, without scikit-learn's warning).
"""

from __future__ import annotations

import warnings

import numpy as np


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, max_iter: int = 300, seed: int = 0
) -> np.ndarray:
    """Predicted labels ``int[M]`` for ``test_x: float[M, D]`` from a logistic regression fitted
    on ``train_x: float[N, D]``, ``train_y: int[N]``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean, std = float(train_x.mean()), float(train_x.std()) or 1.0
    model = LogisticRegression(max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit((train_x - mean) / std, train_y)
    return model.predict((test_x - mean) / std)
