"""CompRess losses against independent NumPy computations, and the ring queue's behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress_edge.errors import TrainingError
from compress_edge.losses import CompRess1Q, CompRess2Q, RegressionLoss, RingQueue, build_loss


def _np_normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _np_kl(teacher, q_t, student, q_s, temp):
    p = _np_softmax(_np_normalise(teacher) @ q_t.T / temp)
    q = _np_softmax(_np_normalise(student) @ q_s.T / temp)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def _fill(queue: RingQueue, rng) -> np.ndarray:
    keys = _np_normalise(rng.normal(size=(queue.size, queue.dim))).astype(np.float32)
    queue.push(torch.from_numpy(keys))
    return keys


def test_2q_loss_matches_numpy():
    rng = np.random.default_rng(0)
    loss_fn = CompRess2Q(teacher_dim=12, student_dim=5, queue_size=40, temperature=0.07)
    q_t, q_s = _fill(loss_fn.teacher_queue, rng), _fill(loss_fn.student_queue, rng)
    teacher = rng.normal(size=(6, 12)).astype(np.float32)
    student = rng.normal(size=(6, 5)).astype(np.float32)
    got = loss_fn(torch.from_numpy(student), torch.from_numpy(teacher)).item()
    want = _np_kl(teacher, q_t, student, q_s, 0.07)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert want > 0.01  # the case is not trivial


def test_1q_loss_matches_numpy_through_projection():
    rng = np.random.default_rng(1)
    loss_fn = CompRess1Q(teacher_dim=8, student_dim=4, queue_size=30, temperature=0.04)
    q_t = _fill(loss_fn.teacher_queue, rng)
    teacher = rng.normal(size=(5, 8)).astype(np.float32)
    student = rng.normal(size=(5, 4)).astype(np.float32)
    w = loss_fn.projection.weight.detach().numpy()
    b = loss_fn.projection.bias.detach().numpy()
    got = loss_fn(torch.from_numpy(student), torch.from_numpy(teacher)).item()
    want = _np_kl(teacher, q_t, student @ w.T + b, q_t, 0.04)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_loss_is_zero_when_student_equals_teacher_and_queues_agree():
    rng = np.random.default_rng(2)
    loss_fn = CompRess2Q(teacher_dim=6, student_dim=6, queue_size=20)
    keys = torch.from_numpy(_np_normalise(rng.normal(size=(20, 6))).astype(np.float32))
    loss_fn.teacher_queue.push(keys)
    loss_fn.student_queue.push(keys)
    x = torch.randn(4, 6)
    assert loss_fn(x, x * 3.0).item() == pytest.approx(0.0, abs=1e-6)  # scale does not matter
    assert loss_fn(torch.randn(4, 6), x).item() > 1e-3


def test_regression_losses_match_numpy():
    rng = np.random.default_rng(3)
    teacher = rng.normal(size=(8, 6)).astype(np.float32)
    student = rng.normal(size=(8, 3)).astype(np.float32)
    plain = RegressionLoss(6, 3)
    w, b = plain.projection.weight.detach().numpy(), plain.projection.bias.detach().numpy()
    want = np.mean(np.sum((_np_normalise(student @ w.T + b) - _np_normalise(teacher)) ** 2, axis=1))
    assert plain(torch.from_numpy(student), torch.from_numpy(teacher)).item() == pytest.approx(want, rel=1e-4)

    bn = RegressionLoss(6, 3, batch_norm=True)
    bn.train()
    w, b = bn.projection.weight.detach().numpy(), bn.projection.bias.detach().numpy()
    standard = (teacher - teacher.mean(0)) / np.sqrt(teacher.var(0) + 1e-5)
    want = np.mean(np.sum((_np_normalise(student @ w.T + b) - _np_normalise(standard)) ** 2, axis=1))
    assert bn(torch.from_numpy(student), torch.from_numpy(teacher)).item() == pytest.approx(want, rel=1e-4)


def test_queue_wraps_around_in_place():
    q = RingQueue(size=5, dim=2)
    bank_ptr = q.bank.data_ptr()
    q.push(torch.tensor([[1.0, 0], [2, 0], [3, 0]]))
    assert int(q.filled) == 3 and int(q.ptr) == 3
    assert q.anchors().shape == (3, 2)
    q.push(torch.tensor([[4.0, 0], [5, 0], [6, 0]]))  # crosses the end: 6 lands in slot 0
    assert int(q.filled) == 5 and int(q.ptr) == 1
    assert q.bank[:, 0].tolist() == [6, 2, 3, 4, 5]
    q.push(torch.arange(14, dtype=torch.float32).reshape(7, 2))  # more than the queue: newest 5 kept
    assert sorted(q.bank[:, 0].tolist()) == [4, 6, 8, 10, 12]
    assert q.bank.data_ptr() == bank_ptr  # written in place, never reallocated


def test_first_step_has_no_anchors_but_keeps_the_graph():
    loss_fn = CompRess2Q(teacher_dim=4, student_dim=4, queue_size=8)
    student = torch.randn(3, 4, requires_grad=True)
    loss = loss_fn(student, torch.randn(3, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None
    assert int(loss_fn.teacher_queue.filled) == 0  # keys wait for commit(), after backward
    loss_fn.commit()
    assert int(loss_fn.teacher_queue.filled) == 3


def test_current_batch_is_not_its_own_anchor():
    loss_fn = CompRess2Q(teacher_dim=4, student_dim=4, queue_size=8)
    loss_fn.teacher_queue.push(torch.eye(4)[:2])
    loss_fn.student_queue.push(torch.eye(4)[:2])
    teacher = torch.randn(2, 4)
    loss_fn(torch.randn(2, 4, requires_grad=True), teacher).backward()
    loss_fn.commit()
    # The anchors used were the 2 old ones; the batch itself only arrives afterwards.
    assert int(loss_fn.teacher_queue.filled) == 4
    torch.testing.assert_close(loss_fn.teacher_queue.bank[2:4], torch.nn.functional.normalize(teacher, dim=1))


def test_only_the_student_side_gets_gradients():
    loss_fn = build_loss("compress-2q", teacher_dim=6, student_dim=4, queue_size=16)
    loss_fn.teacher_queue.push(torch.randn(16, 6))
    loss_fn.student_queue.push(torch.randn(16, 4))
    student = torch.randn(5, 4, requires_grad=True)
    teacher = torch.randn(5, 6, requires_grad=True)
    key = torch.randn(5, 4, requires_grad=True)
    loss_fn(student, teacher, key).backward()  # raises if a queue was overwritten under autograd
    loss_fn.commit()
    loss_fn(student, teacher, key).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None or teacher.grad.abs().sum() == 0
    assert key.grad is None or key.grad.abs().sum() == 0


def test_unknown_method_lists_the_choices():
    with pytest.raises(TrainingError, match="compress-2q"):
        build_loss("compress-3q", 4, 4)
