"""Distillation losses: CompRess (2 queues, 1 queue) and the paper's regression baselines.

CompRess: S. Abbasi Koohpayegani, A. Tejankar, H. Pirsiavash, "CompRess: Self-Supervised Learning by
Compressing Representations", NeurIPS 2020. The student learns to reproduce the teacher's
*similarity distribution* over a queue of anchor embeddings:

    p_t = softmax(t . Q_t^T / T),   p_s = softmax(s . Q_s^T / T),   loss = KL(p_t || p_s), batch mean

with t, s and the anchors L2-normalised. Paper defaults: queue 128,000, T = 0.04.

Every loss here is an ``nn.Module`` called as ``loss(student, teacher, student_key=None)`` with
``student`` (B, Ds) the student's embeddings (with grad), ``teacher`` (B, Dt) the frozen teacher's
and ``student_key`` (B, Ds) a momentum encoder's embeddings of the same images (2-queue only). It
returns a scalar. The queue methods keep this step's keys pending and write them into the queues
in ``commit()``, which the training engine calls after the backward pass (the next forward commits
them too, if nobody did): the current batch is never its own anchor, as in the paper's code, and
the anchors that autograd saved for the backward pass are not overwritten under it.

The queues are ring buffers written in place: no copy of a queue is made per step (the paper's
code clones the whole queue every step to dodge the autograd problem above). Until a queue
has wrapped once, only its filled slots are anchors (a slice, not a copy); the very first step has
no anchors and returns a zero loss that still reaches every trainable parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from compress_edge.defaults import METHODS, PAPER_QUEUE_SIZE, PAPER_TEMPERATURE
from compress_edge.errors import TrainingError

__all__ = ["METHODS", "PAPER_QUEUE_SIZE", "PAPER_TEMPERATURE"]


def gather_from_all_ranks(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, D) from every rank in rank order -> (world * B, D); identity without DDP.

    Queue keys go through this before they are enqueued, so every rank's queue is identical (MoCo).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class RingQueue(nn.Module):
    """A ring buffer of ``size`` embeddings of dimension ``dim``, kept as module buffers.

    ``bank`` (size, dim) float32, ``ptr`` the next write slot, ``filled`` how many slots hold real
    keys. ``anchors()`` returns a view of the valid rows; ``push(keys)`` writes (B, dim) keys in place.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise TrainingError(f"a queue needs a positive size and dimension, got {size} x {dim}")
        self.size = int(size)
        self.dim = int(dim)
        self.register_buffer("bank", torch.zeros(self.size, self.dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def anchors(self) -> torch.Tensor:
        n = int(self.filled)
        return self.bank if n >= self.size else self.bank[:n]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        keys = keys.detach().to(self.bank.dtype)
        if keys.shape[0] > self.size:  # only the newest `size` keys survive a wrap within one push
            keys = keys[-self.size :]
        b = keys.shape[0]
        p = int(self.ptr)
        first = min(b, self.size - p)
        self.bank[p : p + first].copy_(keys[:first])
        if first < b:
            self.bank[: b - first].copy_(keys[first:])
        self.ptr.fill_((p + b) % self.size)
        self.filled.fill_(min(int(self.filled) + b, self.size))


def similarity_kl(
    teacher: torch.Tensor,
    teacher_anchors: torch.Tensor,
    student: torch.Tensor,
    student_anchors: torch.Tensor,
    t_teacher: float,
    t_student: float,
) -> torch.Tensor:
    """KL(softmax(teacher @ Qt^T / Tt) || softmax(student @ Qs^T / Ts)), mean over the batch.

    teacher (B, Dt), teacher_anchors (K, Dt), student (B, Ds), student_anchors (K, Ds); all
    normalised. Computed in float32 whatever autocast says: a softmax over 10^5 anchors at T = 0.04
    is not safe in half precision.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        logits_t = teacher.float() @ teacher_anchors.float().T / t_teacher
        logits_s = student.float() @ student_anchors.float().T / t_student
        log_p_t = F.log_softmax(logits_t, dim=1)
        log_p_s = F.log_softmax(logits_s, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def _zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    # Keeps the graph connected (DDP expects every trainable parameter to get a gradient).
    return sum((t.sum() * 0.0 for t in tensors), torch.zeros((), device=tensors[0].device))


class CompRess2Q(nn.Module):
    """CompRess with two queues: teacher anchors Q_t (K, Dt) and student anchors Q_s (K, Ds).

    Q_s holds the same images' embeddings as Q_t, from a momentum (EMA) copy of the student
    (``compress-2q``) or from the student's own detached embeddings (``compress-2q-nomomentum``,
    call without ``student_key``). Shapes: student (B, Ds), teacher (B, Dt), student_key (B, Ds).
    """

    def __init__(
        self,
        teacher_dim: int,
        student_dim: int,
        queue_size: int = PAPER_QUEUE_SIZE,
        temperature: float = PAPER_TEMPERATURE,
        student_temperature: float | None = None,
    ):
        super().__init__()
        self.t_teacher = float(temperature)
        self.t_student = float(student_temperature or temperature)
        self.teacher_queue = RingQueue(queue_size, teacher_dim)
        self.student_queue = RingQueue(queue_size, student_dim)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, student_key: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.commit()
        s = F.normalize(student.float(), dim=1)
        t = F.normalize(teacher.detach().float(), dim=1)
        key = s.detach() if student_key is None else F.normalize(student_key.detach().float(), dim=1)
        if int(self.teacher_queue.filled) == 0:
            loss = _zero_loss(student)
        else:
            loss = similarity_kl(
                t, self.teacher_queue.anchors(), s, self.student_queue.anchors(), self.t_teacher, self.t_student
            )
        self._pending = (gather_from_all_ranks(t), gather_from_all_ranks(key))
        return loss

    @torch.no_grad()
    def commit(self) -> None:
        """Enqueue the keys of the last forward (call after backward)."""
        if self._pending is not None:
            t, key = self._pending
            self._pending = None
            self.teacher_queue.push(t)
            self.student_queue.push(key)


class CompRess1Q(nn.Module):
    """CompRess with one queue: the student, through a learned linear map (Ds -> Dt), is scored
    against the teacher's queue Q_t (K, Dt). Shapes: student (B, Ds), teacher (B, Dt)."""

    def __init__(
        self,
        teacher_dim: int,
        student_dim: int,
        queue_size: int = PAPER_QUEUE_SIZE,
        temperature: float = PAPER_TEMPERATURE,
        student_temperature: float | None = None,
    ):
        super().__init__()
        self.t_teacher = float(temperature)
        self.t_student = float(student_temperature or temperature)
        self.projection = nn.Linear(student_dim, teacher_dim)
        self.teacher_queue = RingQueue(queue_size, teacher_dim)
        self._pending: torch.Tensor | None = None

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, student_key: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.commit()
        with torch.autocast(device_type=student.device.type, enabled=False):
            s = F.normalize(self.projection(student.float()), dim=1)
        t = F.normalize(teacher.detach().float(), dim=1)
        if int(self.teacher_queue.filled) == 0:
            loss = _zero_loss(s)
        else:
            anchors = self.teacher_queue.anchors()
            loss = similarity_kl(t, anchors, s, anchors, self.t_teacher, self.t_student)
        self._pending = gather_from_all_ranks(t)
        return loss

    @torch.no_grad()
    def commit(self) -> None:
        """Enqueue the keys of the last forward (call after backward)."""
        if self._pending is not None:
            t, self._pending = self._pending, None
            self.teacher_queue.push(t)


class RegressionLoss(nn.Module):
    """The paper's regression baseline: MSE between the L2-normalised teacher embedding (B, Dt) and
    the L2-normalised linear projection (Ds -> Dt) of the student (B, Ds), summed over dimensions
    and averaged over the batch (equal to 2 - 2 cos).

    ``batch_norm=True`` (``regression-bn``) standardises the teacher side with a BatchNorm without
    affine parameters first, so that every teacher dimension weighs the same.
    """

    def __init__(self, teacher_dim: int, student_dim: int, batch_norm: bool = False):
        super().__init__()
        self.projection = nn.Linear(student_dim, teacher_dim)
        self.teacher_bn = nn.BatchNorm1d(teacher_dim, affine=False) if batch_norm else None

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, student_key: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.autocast(device_type=student.device.type, enabled=False):
            target = teacher.float().detach()
            if self.teacher_bn is not None:
                target = self.teacher_bn(target)
            target = F.normalize(target, dim=1)
            pred = F.normalize(self.projection(student.float()), dim=1)
            return (pred - target).pow(2).sum(dim=1).mean()


def build_loss(
    method: str,
    teacher_dim: int,
    student_dim: int,
    queue_size: int = PAPER_QUEUE_SIZE,
    temperature: float = PAPER_TEMPERATURE,
    student_temperature: float | None = None,
) -> nn.Module:
    """The loss module for a ``--method`` name (one of ``METHODS``)."""
    builders = {
        "compress-2q": lambda: CompRess2Q(teacher_dim, student_dim, queue_size, temperature, student_temperature),
        "compress-2q-nomomentum": lambda: CompRess2Q(
            teacher_dim, student_dim, queue_size, temperature, student_temperature
        ),
        "compress-1q": lambda: CompRess1Q(teacher_dim, student_dim, queue_size, temperature, student_temperature),
        "regression": lambda: RegressionLoss(teacher_dim, student_dim, batch_norm=False),
        "regression-bn": lambda: RegressionLoss(teacher_dim, student_dim, batch_norm=True),
    }
    if method not in builders:
        raise TrainingError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return builders[method]()


def uses_momentum_encoder(method: str) -> bool:
    return method == "compress-2q"


def commit_queues(module: nn.Module) -> None:
    """Write the pending keys of every queue loss inside ``module`` (after backward)."""
    for m in module.modules():
        if hasattr(m, "commit") and hasattr(m, "_pending"):
            m.commit()


# ----------------------------------------------------------------------------------------------
# self-supervised losses for teacher pretraining (and the from-scratch student baseline)
# ----------------------------------------------------------------------------------------------
class NTXent(nn.Module):
    """SimCLR's NT-Xent loss (T. Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020).

    z1, z2: (B, D) projections of two views of the same B images. Each of the 2B vectors has its
    other view as the positive and the 2(B - 1) other vectors as negatives; cross-entropy over
    cosine similarities / T, averaged over the 2B anchors. With DDP, negatives come from every rank.
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1 = F.normalize(z1.float(), dim=1)
            z2 = F.normalize(z2.float(), dim=1)
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            b = z1.shape[0]
            # Gradients flow through the local views only; other ranks' views are negatives.
            all1, all2 = gather_from_all_ranks(z1.detach()), gather_from_all_ranks(z2.detach())
            all1 = torch.cat([all1[: rank * b], z1, all1[(rank + 1) * b :]])
            all2 = torch.cat([all2[: rank * b], z2, all2[(rank + 1) * b :]])
            z = torch.cat([all1, all2])  # (2N, D)
            n = all1.shape[0]
            local = torch.arange(rank * b, (rank + 1) * b, device=z.device)
            anchors = torch.cat([local, local + n])
            positives = torch.cat([local + n, local])
            logits = z[anchors] @ z.T / self.temperature  # (2B, 2N)
            logits[torch.arange(2 * b, device=z.device), anchors] = float("-inf")  # not itself
            return F.cross_entropy(logits, positives)


class MoCoLoss(nn.Module):
    """MoCo v2's InfoNCE with a queue of negative keys (X. Chen et al., "Improved Baselines with
    Momentum Contrastive Learning", 2020).

    q: (B, D) queries from the encoder, k: (B, D) keys of the other view from the momentum encoder.
    logits = [q.k, q.queue] / T, target 0. Keys are enqueued in ``commit()`` after backward.
    """

    def __init__(self, dim: int, queue_size: int = 65_536, temperature: float = 0.2):
        super().__init__()
        self.temperature = float(temperature)
        self.queue = RingQueue(queue_size, dim)
        self._pending: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        self.commit()
        with torch.autocast(device_type=q.device.type, enabled=False):
            q = F.normalize(q.float(), dim=1)
            k = F.normalize(k.detach().float(), dim=1)
            pos = (q * k).sum(dim=1, keepdim=True)
            logits = torch.cat([pos, q @ self.queue.anchors().T], dim=1) / self.temperature
            loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        self._pending = gather_from_all_ranks(k)
        return loss

    @torch.no_grad()
    def commit(self) -> None:
        if self._pending is not None:
            k, self._pending = self._pending, None
            self.queue.push(k)
