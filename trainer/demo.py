"""The built-in demo's quality check: does a classifier fitted on real digits recognise the samples?"""
from __future__ import annotations

import torch


def digits_classifier_accuracy(samples: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy on generated samples, held-out accuracy on real digits) of a logistic regression.

    The classifier is fitted on 80% of the real 8×8 digits; the held-out 20% shows what it can do
    on real data, so a low sample accuracy means bad samples, not a bad classifier.
    """
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data / 16.0, d.target, test_size=0.2, random_state=0, stratify=d.target)
    clf = LogisticRegression(max_iter=2000).fit(xtr, ytr)
    real_acc = float(clf.score(xte, yte))
    x = samples.float()
    if x.shape[-1] != 8:
        x = torch.nn.functional.interpolate(x, size=(8, 8), mode="area")
    feats = ((x.clamp(-1, 1) + 1) / 2).reshape(len(x), -1).numpy()
    return float((clf.predict(feats) == labels.numpy()).mean()), real_acc
