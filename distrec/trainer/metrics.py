"""Exact AUC and logloss, and their distributed form over all ranks' predictions.

    auc(np.array([0.1, 0.8, 0.4]), np.array([0, 1, 1]))  # 1.0

The distributed evaluation gathers every rank's predictions and labels and computes the metrics once
over all of them: an average of per-rank AUCs is not the AUC of the whole split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula; tied scores count half."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0.5
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # Average the 1-based ranks over each run of equal scores, so ties count half.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def expected_auc(probs: np.ndarray, scores: np.ndarray) -> float:
    """AUC expected when labels are drawn Bernoulli(probs) and ranked by scores (ties ignored).

    Used to calibrate the synthetic teacher without drawing labels."""
    order = np.argsort(scores, kind="mergesort")
    p = np.asarray(probs, dtype=np.float64)[order]
    neg_below = np.cumsum(1 - p) - (1 - p)
    pos, neg = p.sum(), (1 - p).sum()
    return float((p * neg_below).sum() / (pos * neg))


def gather_predictions(probs: torch.Tensor, labels: torch.Tensor, ctx) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' (probs, labels) concatenated in rank order, on every rank (``ctx``: a DistContext)."""
    from distrec.trainer.dist import all_gather_rows

    local = torch.stack([probs.detach().float().cpu(), labels.detach().float().cpu()], dim=1)  # [rows, 2]
    both = all_gather_rows(local, ctx).numpy()
    return both[:, 0], both[:, 1]


HIGHER_IS_BETTER = {"auc": True, "logloss": False}


@dataclass
class Tracker:
    """The best value of ``metric`` so far, at which step, and how many evaluations have not beaten it:
    early stopping, the best checkpoint and the plateau schedule all judge "better" here."""

    metric: str
    best: float | None = None
    best_step: int = -1
    since: int = 0

    def update(self, step: int, value: float) -> bool:
        """True when ``value`` beats the best so far (the first value always does; NaN never does)."""
        higher = HIGHER_IS_BETTER[self.metric]
        if self.best is None or (not math.isnan(value) and (math.isnan(self.best) or
                                                              (value > self.best if higher else value < self.best))):
            self.best, self.best_step, self.since = value, step, 0
            return True
        self.since += 1
        return False
