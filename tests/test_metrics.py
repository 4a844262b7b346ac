import numpy as np
import pytest

from distrec.trainer.metrics import auc, expected_auc, logloss


def brute_force_auc(scores, labels):
    """P(score of a positive > score of a negative), ties counting half: the definition."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (pos.size * neg.size)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_the_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(700) < 0.3).astype(np.float32)
    scores = rng.integers(0, 20, 700) + labels * rng.integers(0, 5, 700)  # many ties
    assert auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_auc_edge_cases():
    assert auc(np.array([0.1, 0.8, 0.4]), np.array([0, 1, 1])) == 1.0
    assert auc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0
    assert auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert np.isnan(auc(np.array([0.5, 0.2]), np.array([1, 1])))


def test_logloss_by_hand():
    assert logloss(np.array([0.8, 0.3]), np.array([1, 0])) == pytest.approx(-(np.log(0.8) + np.log(0.7)) / 2)


def test_expected_auc_matches_drawn_labels():
    rng = np.random.default_rng(1)
    p = 1 / (1 + np.exp(-rng.normal(-2, 1.5, 200_000)))
    drawn = [auc(p, rng.random(p.size) < p) for _ in range(3)]
    assert expected_auc(p, p) == pytest.approx(np.mean(drawn), abs=0.005)
