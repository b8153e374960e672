"""retain.cl.metrics on matrices and streams computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from retain.cl import metrics as M

# R[i][j]: accuracy on task j after learning task i (three tasks)
R = [[0.9, 0.2, 0.1],
     [0.6, 0.8, 0.3],
     [0.5, 0.7, 0.95]]
BASE = [0.1, 0.15, 0.2]


def test_matrix_metrics_by_hand():
    assert M.average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert M.backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert M.forward_transfer(R, BASE) == pytest.approx(((0.2 - 0.15) + (0.3 - 0.2)) / 2)
    # task 0: best of rows 0..1 is 0.9 -> 0.9 - 0.5; task 1: best of row 1 is 0.8 -> 0.8 - 0.7
    assert M.forgetting(R) == pytest.approx((0.4 + 0.1) / 2)


def test_forgetting_takes_the_best_row_after_learning_not_the_diagonal():
    R2 = [[0.5, 0.0], [0.9, 0.8], [0.6, 0.8]]  # not square: refused
    with pytest.raises(ValueError, match=r"retain\.cl\.metrics\.forgetting: R must be a non-empty square"):
        M.forgetting(R2)
    R3 = [[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.8, 0.7]]
    assert M.forgetting(R3) == pytest.approx(((0.9 - 0.6) + 0.0) / 2)     # max over rows 0..1 for task 0
    assert M.backward_transfer(R3) == pytest.approx(((0.6 - 0.5) + 0.0) / 2)  # positive: task 0 improved


def test_losses_read_with_lower_is_better():
    L = [[1.0, 3.0], [2.5, 1.2]]  # task 0's loss rose from 1.0 to 2.5
    assert M.forgetting(L, lower_is_better=True) == pytest.approx(1.5)
    assert M.backward_transfer(L, lower_is_better=True) == pytest.approx(-1.5)
    assert M.forward_transfer(L, [4.0, 4.0], lower_is_better=True) == pytest.approx(1.0)  # 3.0 < the baseline 4.0
    assert M.average_accuracy(torch.tensor(L)) == pytest.approx(1.85)


def test_streaming_min_acc_and_wc_acc_by_hand():
    # 6 evaluation steps: task 0 during steps 0-1, task 1 during 2-3, task 2 during 4-5
    A = [[0.5, 0.0, 0.0],
         [0.9, 0.1, 0.0],
         [0.4, 0.6, 0.1],   # stability gap: task 0 drops right after the switch
         [0.7, 0.9, 0.1],
         [0.6, 0.5, 0.8],
         [0.8, 0.7, 0.9]]
    task = [0, 0, 1, 1, 2, 2]
    lo = M.min_acc(A, task)
    assert math.isnan(lo[0]) and math.isnan(lo[1])
    assert lo[2:].tolist() == pytest.approx([0.4, 0.4, (0.4 + 0.5) / 2, (0.4 + 0.5) / 2])
    wc = M.wc_acc(A, task)
    assert wc[:2].tolist() == pytest.approx([0.5, 0.9])
    assert wc[2:].tolist() == pytest.approx([0.5 * 0.6 + 0.5 * 0.4, 0.5 * 0.9 + 0.5 * 0.4,
                                             0.8 / 3 + 2 / 3 * 0.45, 0.9 / 3 + 2 / 3 * 0.45])


@pytest.mark.parametrize("call,match", [
    (lambda: M.backward_transfer([[1.0]]), r"backward_transfer: needs at least 2 tasks, got 1"),
    (lambda: M.forward_transfer(R, [0.1]), r"forward_transfer: baseline must hold one score per task \(3\), got 1"),
    (lambda: M.average_accuracy("abc"), r"average_accuracy: R must be a square matrix of numbers"),
    (lambda: M.min_acc([[1.0, 2.0]], [0.5]), r"min_acc: task_of_step must hold one integer task index per step"),
    (lambda: M.wc_acc([[1.0, 2.0], [1.0, 2.0]], [1, 0]), r"wc_acc: task_of_step must be non-decreasing"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=r"retain\.cl\.metrics\." + match):
        call()
