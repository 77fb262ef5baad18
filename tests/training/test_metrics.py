"""MMSA metrics on small cases worked out by hand (see the comments for the arithmetic)."""

from __future__ import annotations

import math

import pytest

from model.training.metrics import (
    compute_metrics,
    mosei_regression_metrics,
    multiclass_accuracy,
    pearson_r,
    rated_text_metrics,
    sims_regression_metrics,
    weighted_f1,
)


def test_weighted_f1_counts_unpredicted_class_as_zero() -> None:
    # class 0: support 1, tp 1, predicted 2 -> 2/3; class 1: tp 0 -> 0; class 2: 1.0 (support 2)
    assert weighted_f1([0, 1, 2, 2], [0, 0, 2, 2]) == pytest.approx((2 / 3 + 0 + 2) / 4)


def test_multiclass_accuracy_rounds_half_to_even() -> None:
    # round(2.5) = 2 and round(-0.5) = -0 as numpy rounds; 2.5 therefore misses 3
    assert multiclass_accuracy([2.5, -0.5, 1.5], [3.0, 0.0, 2.0]) == pytest.approx(2 / 3)


def test_pearson_r_by_hand() -> None:
    # dp = [-1, 0, 1], dy = [-7/3, -1/3, 8/3]: cov 5, |dp|^2 2, |dy|^2 114/9
    assert pearson_r([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert math.isnan(pearson_r([1, 1, 1], [1, 2, 3]))


def test_mosei_metrics_by_hand() -> None:
    preds = [2.4, -0.4, 0.0, 1.5, -2.5]
    labels = [3.0, 0.0, -1.0, 1.6, -2.2]
    m = mosei_regression_metrics(preds, labels)
    # |errors| = 0.6, 0.4, 1.0, 0.1, 0.3
    assert m["MAE"] == pytest.approx(0.48)
    # Has0: truth >= 0 -> T T F T F, preds >= 0 -> T F T T F: 3 of 5 agree
    assert m["Has0_acc_2"] == pytest.approx(0.6)
    # F1(T) = 2*2/(3+3), support 3; F1(F) = 2*1/(2+2), support 2
    assert m["Has0_F1_score"] == pytest.approx((4 / 6 * 3 + 0.5 * 2) / 5)
    # Non0 drops the label 0: T F T F against T F T F (pred 0.0 is not > 0)
    assert m["Non0_acc_2"] == pytest.approx(1.0)
    assert m["Non0_F1_score"] == pytest.approx(1.0)
    # Acc-7 rounds [2, -0, 0, 2, -2] against [3, 0, -1, 2, -2]
    assert m["Mult_acc_7"] == pytest.approx(0.6)
    # Acc-5 clips to [-2, 2] first: [2, -0, 0, 2, -2] against [2, 0, -1, 2, -2]
    assert m["Mult_acc_5"] == pytest.approx(0.8)
    assert m["Corr"] == pytest.approx(pearson_r(preds, labels))


def test_sims_metrics_by_hand() -> None:
    preds = [-1.3, -0.1, 0.05, 0.15, 0.75, 0.0]
    labels = [-0.8, -0.2, 0.0, 0.2, 1.0, 0.6]
    m = sims_regression_metrics(preds, labels)
    # 2 classes {[-1,0], (0,1]}: preds 0 0 1 1 1 0, labels 0 0 0 1 1 1
    assert m["Mult_acc_2"] == pytest.approx(4 / 6)
    # 3 classes: preds 0 0 1 2 2 1, labels 0 0 1 2 2 2 (-0.1 falls in the lowest class)
    assert m["Mult_acc_3"] == pytest.approx(5 / 6)
    # 5 classes: preds 0 1 2 3 4 2, labels 0 1 2 3 4 3
    assert m["Mult_acc_5"] == pytest.approx(5 / 6)
    # each binary class: support 3, tp 2, predicted 3 -> 2/3
    assert m["F1_score"] == pytest.approx(2 / 3)
    # clipped errors: 0.2, 0.1, 0.05, 0.05, 0.25, 0.6
    assert m["MAE"] == pytest.approx(1.25 / 6)


def test_rated_text_metrics_drop_zero_ratings_for_sign() -> None:
    m = rated_text_metrics([1.0, -1.0, 0.5, 2.0], [2.0, -0.5, 0.0, -1.0])
    # sign over the non-zero ratings: T F F vs T F T -> 2 of 3
    assert m["Acc_2"] == pytest.approx(2 / 3)
    assert m["MAE"] == pytest.approx((1.0 + 0.5 + 0.5 + 3.0) / 4)
    assert m["N"] == 4


def test_compute_metrics_rejects_unknown_kind() -> None:
    assert compute_metrics("SIMS", [0.1], [0.2])["Mult_acc_2"] == 1.0
    with pytest.raises(ValueError, match="unknown metric set"):
        compute_metrics("imdb", [0.1], [0.2])
