"""CompRess losses against independent NumPy computations, and the ring queue's behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress_edge.errors import TrainingError
from compress_edge.train.losses import CompRess1Q, CompRess2Q, RegressionLoss, RingQueue, build_loss


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


# --------------------------------------------------------------------------------------------------
# anchors from the query's own image are masked
# --------------------------------------------------------------------------------------------------
def _filled_with_ids(loss_fn, rng, ids):
    """Fill every queue of ``loss_fn`` with random keys tagged with ``ids``; returns the keys per queue."""
    queues = [m for m in loss_fn.modules() if isinstance(m, RingQueue)]
    keys = [_np_normalise(rng.normal(size=(q.size, q.dim))).astype(np.float32) for q in queues]
    for q, k in zip(queues, keys, strict=True):
        q.push(torch.from_numpy(k), torch.as_tensor(ids))
    return keys


@pytest.mark.parametrize("method", ["compress-2q", "compress-1q"])
def test_masked_loss_ignores_a_planted_copy_of_the_query(method):
    rng = np.random.default_rng(7)
    ids = np.arange(100, 120)
    ids[5] = 3  # slot 5 holds a (stale) copy of image 3, the first query below
    masked = build_loss(method, teacher_dim=8, student_dim=6, queue_size=20, temperature=0.04)
    keys = _filled_with_ids(masked, rng, ids)
    teacher = rng.normal(size=(4, 8)).astype(np.float32)
    student = rng.normal(size=(4, 6)).astype(np.float32)
    index = torch.tensor([3, 40, 41, 42])
    got = masked(torch.from_numpy(student), torch.from_numpy(teacher), None, index).item()

    # The reference: query 0 against every slot but 5, the others against all 20 slots.
    q_t = keys[0]
    if method == "compress-1q":
        w, b = masked.projection.weight.detach().numpy(), masked.projection.bias.detach().numpy()
        s_in, q_s = student @ w.T + b, q_t
    else:
        s_in, q_s = student, keys[1]
    keep = np.arange(20) != 5
    want = np.mean([_np_kl(teacher[:1], q_t[keep], s_in[:1], q_s[keep], 0.04)]
                   + [_np_kl(teacher[i : i + 1], q_t, s_in[i : i + 1], q_s, 0.04) for i in range(1, 4)])
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)

    # Whatever the planted copy holds, the masked loss of its own image does not change; the paper's does.
    paper = build_loss(method, teacher_dim=8, student_dim=6, queue_size=20, temperature=0.04, mask_self=False)
    paper.load_state_dict(masked.state_dict())
    first = (torch.from_numpy(student[:1]), torch.from_numpy(teacher[:1]), None, index[:1])
    results = []
    own = {8: torch.from_numpy(teacher[0]), 6: torch.from_numpy(student[0])}  # by queue dimension
    for value in (1.0, -1.0):  # the slot holds the query's own embeddings, then their opposite
        row = []
        for m in (masked, paper):
            m._pending.clear()
            for q in (mod for mod in m.modules() if isinstance(mod, RingQueue)):
                q.bank[5] = value * torch.nn.functional.normalize(own[q.dim], dim=0)
            row.append(m(*first).item())
        results.append(row)
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1] != pytest.approx(results[1][1], rel=1e-3)


def test_masked_self_copy_gets_no_gradient_and_a_fully_masked_row_is_finite():
    loss_fn = CompRess2Q(teacher_dim=4, student_dim=4, queue_size=3, temperature=0.04)
    loss_fn.teacher_queue.push(torch.nn.functional.normalize(torch.randn(3, 4), dim=1), torch.tensor([7, 7, 7]))
    loss_fn.student_queue.push(torch.nn.functional.normalize(torch.randn(3, 4), dim=1), torch.tensor([7, 7, 7]))
    student = torch.randn(2, 4, requires_grad=True)
    loss = loss_fn(student, torch.randn(2, 4), None, torch.tensor([7, 8]))  # row 0: every anchor is its own
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad[0].abs().sum() == 0  # nothing to learn from a row with no other image


def test_queue_remembers_image_ids_through_a_wrap():
    q = RingQueue(size=4, dim=2)
    q.push(torch.zeros(3, 2), torch.tensor([1, 2, 3]))
    q.push(torch.zeros(2, 2), torch.tensor([4, 5]))
    assert q.ids.tolist() == [5, 2, 3, 4]
    q.push(torch.zeros(1, 2))  # unknown origin: never masked
    assert q.ids.tolist() == [5, -1, 3, 4]


def test_moco_never_uses_a_key_of_the_query_image_as_a_negative():
    from compress_edge.train.losses import MoCoLoss

    torch.manual_seed(0)
    masked, paper = MoCoLoss(dim=4, queue_size=6), MoCoLoss(dim=4, queue_size=6, mask_self=False)
    keys = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    for m in (masked, paper):
        m.queue.push(keys, ids)
    q = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    k = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    index = torch.tensor([12, 99])
    got = masked(q, k, index).item()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ keys.T], dim=1) / 0.2
    logits[0, 1 + 2] = float("-inf")  # slot 2 holds image 12's key
    want = torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long)).item()
    assert got == pytest.approx(want, rel=1e-5)
    assert paper(q, k, index).item() != pytest.approx(got, rel=1e-4)


# --------------------------------------------------------------------------------------------------
# the paper's two-queue loss, step by step; the queue state that checkpoints hold
# --------------------------------------------------------------------------------------------------
def _paper_two_queue_losses(memory_t, memory_s, steps, temperature):
    """The 2-queue loss as the paper's code computes it, restated: each step scores the batch against
    the whole memory as it stands, then writes the batch's keys into the next rows (mod K)."""
    memory_t, memory_s = memory_t.clone(), memory_s.clone()
    size, start, losses = memory_t.shape[0], 0, []
    for teacher, student, key in steps:
        t = teacher / teacher.norm(dim=1, keepdim=True)
        s = student / student.norm(dim=1, keepdim=True)
        k = s if key is None else key / key.norm(dim=1, keepdim=True)
        target = torch.softmax(t @ memory_t.T / temperature, dim=1)
        log_q = torch.log_softmax(s @ memory_s.T / temperature, dim=1)
        losses.append(torch.nn.functional.kl_div(log_q, target, reduction="batchmean").item())
        rows = (torch.arange(t.shape[0]) + start) % size
        memory_t[rows], memory_s[rows] = t, k
        start = (start + t.shape[0]) % size
    return losses


@pytest.mark.parametrize("momentum", [True, False])
def test_2q_follows_the_papers_loss_through_queue_wraps(momentum):
    torch.manual_seed(11)
    size, batch, temperature = 20, 6, 0.04
    memory_t = torch.nn.functional.normalize(torch.randn(size, 12), dim=1)
    memory_s = torch.nn.functional.normalize(torch.randn(size, 5), dim=1)
    steps = [(torch.randn(batch, 12), torch.randn(batch, 5), torch.randn(batch, 5) if momentum else None)
             for _ in range(7)]  # 42 keys: the queue wraps twice
    want = _paper_two_queue_losses(memory_t, memory_s, steps, temperature)

    loss_fn = CompRess2Q(teacher_dim=12, student_dim=5, queue_size=size, temperature=temperature, mask_self=False)
    loss_fn.teacher_queue.push(memory_t)
    loss_fn.student_queue.push(memory_s)
    got = []
    for teacher, student, key in steps:
        got.append(loss_fn(student, teacher, key, torch.arange(batch)).item())
        loss_fn.commit()
    assert got == pytest.approx(want, abs=3e-6)


def test_queue_state_keys_are_the_ones_checkpoints_hold():
    from compress_edge.train.losses import MoCoLoss

    ring = {"bank", "ids", "ptr", "filled"}
    assert set(CompRess2Q(6, 4, queue_size=8).state_dict()) == {f"{q}.{b}" for q in ("teacher_queue", "student_queue")
                                                                 for b in ring}
    assert set(CompRess1Q(6, 4, queue_size=8).state_dict()) == ({"projection.weight", "projection.bias"}
                                                                | {f"teacher_queue.{b}" for b in ring})
    assert set(MoCoLoss(4, queue_size=8).state_dict()) == {f"queue.{b}" for b in ring}


@pytest.mark.parametrize("method", ["compress-2q", "compress-1q"])
def test_a_reloaded_loss_continues_where_the_saved_one_stood(method):
    torch.manual_seed(12)
    saved = build_loss(method, teacher_dim=6, student_dim=4, queue_size=10)
    for _ in range(3):  # 12 keys: wrapped, ptr at 2
        saved(torch.randn(4, 4), torch.randn(4, 6), torch.randn(4, 4), torch.randint(0, 50, (4,)))
        saved.commit()
    reloaded = build_loss(method, teacher_dim=6, student_dim=4, queue_size=10)
    reloaded.load_state_dict(saved.state_dict())
    batch = (torch.randn(4, 4), torch.randn(4, 6), torch.randn(4, 4), torch.randint(0, 50, (4,)))
    assert reloaded(*batch).item() == pytest.approx(saved(*batch).item(), abs=1e-7)
    saved.commit(), reloaded.commit()
    for a, b in zip(saved.state_dict().values(), reloaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_commit_queues_commits_every_queue_loss_inside_a_module():
    from compress_edge.train.losses import MoCoLoss, commit_queues

    holder = torch.nn.ModuleDict({"distill": CompRess1Q(4, 3, queue_size=8), "moco": MoCoLoss(3, queue_size=8)})
    holder["distill"](torch.randn(2, 3), torch.randn(2, 4), None, torch.tensor([1, 2]))
    holder["moco"](torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1, 2]))
    assert [int(q.filled) for q in holder.modules() if isinstance(q, RingQueue)] == [0, 0]
    commit_queues(holder)
    assert [int(q.filled) for q in holder.modules() if isinstance(q, RingQueue)] == [2, 2]
    assert [q.ids[:2].tolist() for q in holder.modules() if isinstance(q, RingQueue)] == [[1, 2], [1, 2]]
