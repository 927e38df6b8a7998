import math

import pytest
from slimflow.tasks.students.evaluate import (
    accuracy,
    classification_metrics,
    confusion,
    macro_f1,
    mcc,
    measure_throughput,
    size_on_disk,
)

Y_TRUE = [0, 0, 1, 1, 2, 2]
Y_PRED = [0, 1, 1, 1, 2, 0]


def test_confusion_rows_are_true_classes():
    assert confusion(Y_TRUE, Y_PRED, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_accuracy_and_macro_f1_by_hand():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    # per class F1 = 2tp / (2tp + fp + fn): 2/4, 4/5, 2/3
    assert macro_f1(Y_TRUE, Y_PRED, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a class never true nor predicted counts as 0 in the mean
    assert macro_f1([0, 1], [0, 1], 3) == pytest.approx(2 / 3)


def test_multiclass_mcc_by_hand():
    # Gorodkin: c = 4, s = 6, t = (2, 2, 2), p = (2, 3, 1): (24 - 12) / sqrt((36 - 14)(36 - 12))
    assert mcc(Y_TRUE, Y_PRED, 3) == pytest.approx(12 / math.sqrt(22 * 24))


def test_binary_mcc_matches_the_classic_formula_and_degenerate_cases():
    tp, fn, tn, fp = 2, 1, 1, 1
    classic = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert mcc([1, 1, 1, 0, 0], [1, 0, 1, 0, 1], 2) == pytest.approx(classic)
    assert mcc([0, 1, 0], [0, 0, 0], 2) == 0.0  # one predicted class: undefined, reported as 0
    assert mcc([0, 1], [1, 0], 2) == pytest.approx(-1.0)


def test_classification_metrics_bundle_and_length_mismatch():
    m = classification_metrics(Y_TRUE, Y_PRED, 3)
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="differ in length"):
        confusion([0, 1], [0], 2)


def test_throughput_warms_up_then_times_whole_passes():
    calls = []
    r = measure_throughput(lambda b: calls.append(len(b)), [f"t{i}" for i in range(10)], 4, warmup_batches=2)
    assert calls == [4, 4] + [4, 4, 2]  # 2 warm-up batches, then one pass over 10 texts
    assert r["texts"] == 10 and r["texts_per_s"] == pytest.approx(10 / r["seconds"]) and r["batch_size"] == 4
    with pytest.raises(ValueError):
        measure_throughput(lambda b: None, [], 4)


def test_size_on_disk_of_file_and_directory(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"y" * 5)
    assert size_on_disk(tmp_path / "a") == 10 and size_on_disk(tmp_path) == 15
