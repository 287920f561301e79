"""Distillation losses: CompRess (2 queues, 1 queue) and the paper's regression baselines.

CompRess: S. Abbasi Koohpayegani, A. Tejankar, H. Pirsiavash, "CompRess: Self-Supervised Learning by
Compressing Representations", NeurIPS 2020. The student learns to reproduce the teacher's
*similarity distribution* over a queue of anchor embeddings:

    p_t = softmax(t . Q_t^T / T),   p_s = softmax(s . Q_s^T / T),   loss = KL(p_t || p_s), batch mean

with t, s and the anchors L2-normalised. Paper defaults: queue 128,000, T = 0.04.

Every loss here is an ``nn.Module`` called as ``loss(student, teacher, student_key=None, index=None)``
with ``student`` (B, Ds) the student's embeddings (with grad), ``teacher`` (B, Dt) the frozen
teacher's, ``student_key`` (B, Ds) a momentum encoder's embeddings of the same images (2-queue only)
and ``index`` (B,) the images' dataset indices. It returns a scalar.

Each queue slot remembers the image it came from, and by default (``mask_self``) the anchors that
came from the query's own image are left out of both softmaxes: when the queue holds the whole data
set, each query would otherwise meet a stale copy of itself, whose logit (1/T) dominates. With
``mask_self=False`` the loss is the paper's, exactly. The queue methods keep this step's keys pending and write them into the queues
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
    """Concatenate ``x`` (B, ...) from every rank in rank order -> (world * B, ...); identity without DDP.

    Queue keys (and the image ids beside them) go through this before they are enqueued, so every
    rank's queue is identical (MoCo).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


#: The logit given to a masked anchor: finite, so that a row whose anchors are all masked gives a
#: uniform distribution on both sides (a KL of 0) instead of NaN; exp() of it is exactly 0 in float32.
MASKED_LOGIT = -1e9


class RingQueue(nn.Module):
    """A ring buffer of ``size`` embeddings of dimension ``dim``, kept as module buffers.

    ``bank`` (size, dim) float32; ``ids`` (size,) int64, the dataset index of the image each slot
    came from (-1: unknown or empty); ``ptr`` the next write slot; ``filled`` how many slots hold real
    keys. ``anchors()`` / ``anchor_ids()`` return views of the valid rows; ``push(keys, ids)`` writes
    (B, dim) keys and their (B,) image ids in place.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise TrainingError(f"a queue needs a positive size and dimension, got {size} x {dim}")
        self.size = int(size)
        self.dim = int(dim)
        self.register_buffer("bank", torch.zeros(self.size, self.dim))
        self.register_buffer("ids", torch.full((self.size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def anchors(self) -> torch.Tensor:
        n = int(self.filled)
        return self.bank if n >= self.size else self.bank[:n]

    def anchor_ids(self) -> torch.Tensor:
        n = int(self.filled)
        return self.ids if n >= self.size else self.ids[:n]

    @torch.no_grad()
    def push(self, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        keys = keys.detach().to(self.bank.dtype)
        ids = (torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device) if ids is None
               else ids.detach().to(torch.long))
        if keys.shape[0] > self.size:  # only the newest `size` keys survive a wrap within one push
            keys, ids = keys[-self.size :], ids[-self.size :]
        b = keys.shape[0]
        p = int(self.ptr)
        first = min(b, self.size - p)
        self.bank[p : p + first].copy_(keys[:first])
        self.ids[p : p + first].copy_(ids[:first])
        if first < b:
            self.bank[: b - first].copy_(keys[first:])
            self.ids[: b - first].copy_(ids[first:])
        self.ptr.fill_((p + b) % self.size)
        self.filled.fill_(min(int(self.filled) + b, self.size))


def same_image_mask(index: torch.Tensor | None, anchor_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, K) bool, True where anchor k came from the same image as query b; None when ``index`` is.

    A queue that holds the whole data set (the usual case on a small one) holds a stale copy of
    every query's own image; left in, that copy's logit (1/T = 25 at T = 0.04) dominates both
    softmaxes and the loss drifts towards telling images apart instead of copying the teacher's
    neighbourhoods. Slots of unknown origin (id -1) are never masked.
    """
    if index is None:
        return None
    index = index.to(device=anchor_ids.device, dtype=torch.long).view(-1, 1)
    return (anchor_ids.view(1, -1) == index) & (index >= 0)


def similarity_kl(
    teacher: torch.Tensor,
    teacher_anchors: torch.Tensor,
    student: torch.Tensor,
    student_anchors: torch.Tensor,
    t_teacher: float,
    t_student: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(softmax(teacher @ Qt^T / Tt) || softmax(student @ Qs^T / Ts)), mean over the batch.

    teacher (B, Dt), teacher_anchors (K, Dt), student (B, Ds), student_anchors (K, Ds); all
    normalised. ``mask`` (B, K), True for anchors left out of both softmaxes. Computed in float32
    whatever autocast says: a softmax over 10^5 anchors at T = 0.04 is not safe in half precision.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        logits_t = teacher.float() @ teacher_anchors.float().T / t_teacher
        logits_s = student.float() @ student_anchors.float().T / t_student
        if mask is not None:
            logits_t = logits_t.masked_fill(mask, MASKED_LOGIT)
            logits_s = logits_s.masked_fill(mask, MASKED_LOGIT)
        log_p_t = F.log_softmax(logits_t, dim=1)
        log_p_s = F.log_softmax(logits_s, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def _zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    # Keeps the graph connected (DDP expects every trainable parameter to get a gradient).
    return sum((t.sum() * 0.0 for t in tensors), torch.zeros((), device=tensors[0].device))


class QueueLoss(nn.Module):
    """The one queue base: every loss that keeps queues (``CompRess2Q``, ``CompRess1Q``, ``MoCoLoss``).

    Its queues are :class:`RingQueue` submodules, so their state (``<name>.bank``, ``.ids``, ``.ptr``,
    ``.filled``) is in the loss's state dict and so in every checkpoint. A forward ``commit()``s what
    the last one left, computes its loss against the queues as they stand, and ``stage()``s its keys
    (with their images' ids, for ``mask_for``), gathered from every rank first. The engine calls
    ``commit()`` (through :func:`commit_queues`) after the backward pass, so the current batch is
    never its own anchor, and the anchors autograd saved for the backward pass are not overwritten
    under it.
    """

    def __init__(self, mask_self: bool = True):
        super().__init__()
        self.mask_self = bool(mask_self)
        self._pending: list[tuple[RingQueue, torch.Tensor, torch.Tensor | None]] = []

    def stage(self, queue: RingQueue, keys: torch.Tensor, index: torch.Tensor | None) -> None:
        ids = gather_from_all_ranks(index.to(keys.device, torch.long)) if index is not None else None
        self._pending.append((queue, gather_from_all_ranks(keys), ids))

    def mask_for(self, queue: RingQueue, index: torch.Tensor | None) -> torch.Tensor | None:
        return same_image_mask(index, queue.anchor_ids()) if self.mask_self else None

    @torch.no_grad()
    def commit(self) -> None:
        """Enqueue the keys of the last forward (call after backward)."""
        pending, self._pending = self._pending, []
        for queue, keys, ids in pending:
            queue.push(keys, ids)


class CompRessLoss(QueueLoss):
    """What the CompRess losses share: the teacher's queue Q_t (K, Dt), the two temperatures, and
    the step: the teacher's and the student's similarity distributions over the anchors, their KL
    (:func:`similarity_kl`), then the batch's keys staged. A subclass says where the student's side
    comes from: ``_build_student_side`` makes its modules, ``_embed_student`` returns the normalised
    student embeddings (B, Dt or Ds), the queue that holds its anchors, and the keys to stage into
    that queue (None: nothing to stage, the queue is the teacher's).

    Shapes: student (B, Ds), teacher (B, Dt), student_key (B, Ds), index (B,) the images' dataset
    indices (for ``mask_self``; None: nothing is masked).
    """

    def __init__(self, teacher_dim: int, student_dim: int, queue_size: int = PAPER_QUEUE_SIZE,
                 temperature: float = PAPER_TEMPERATURE, student_temperature: float | None = None,
                 mask_self: bool = True):
        super().__init__(mask_self)
        self.t_teacher = float(temperature)
        self.t_student = float(student_temperature or temperature)
        self.teacher_queue = RingQueue(queue_size, teacher_dim)
        self._build_student_side(teacher_dim, student_dim, queue_size)

    def _build_student_side(self, teacher_dim: int, student_dim: int, queue_size: int) -> None:
        raise NotImplementedError

    def _embed_student(
        self, student: torch.Tensor, student_key: torch.Tensor | None
    ) -> tuple[torch.Tensor, RingQueue, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, student_key: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> torch.Tensor:
        self.commit()
        s, student_queue, key = self._embed_student(student, student_key)
        t = F.normalize(teacher.detach().float(), dim=1)
        if int(self.teacher_queue.filled) == 0:
            loss = _zero_loss(s)
        else:
            loss = similarity_kl(t, self.teacher_queue.anchors(), s, student_queue.anchors(),
                                 self.t_teacher, self.t_student, self.mask_for(self.teacher_queue, index))
        self.stage(self.teacher_queue, t, index)
        if key is not None:
            self.stage(student_queue, key, index)
        return loss


class CompRess2Q(CompRessLoss):
    """CompRess with two queues: teacher anchors Q_t (K, Dt) and student anchors Q_s (K, Ds).

    Q_s holds the same images' embeddings as Q_t, from a momentum (EMA) copy of the student
    (``compress-2q``) or from the student's own detached embeddings (``compress-2q-nomomentum``,
    call without ``student_key``). Shapes as in :class:`CompRessLoss`.
    """

    def _build_student_side(self, teacher_dim: int, student_dim: int, queue_size: int) -> None:
        self.student_queue = RingQueue(queue_size, student_dim)

    def _embed_student(self, student, student_key):
        s = F.normalize(student.float(), dim=1)
        key = s.detach() if student_key is None else F.normalize(student_key.detach().float(), dim=1)
        return s, self.student_queue, key


class CompRess1Q(CompRessLoss):
    """CompRess with one queue: the student, through a learned linear map (Ds -> Dt), is scored
    against the teacher's queue Q_t (K, Dt). Shapes: student (B, Ds), teacher (B, Dt), index (B,)."""

    def _build_student_side(self, teacher_dim: int, student_dim: int, queue_size: int) -> None:
        self.projection = nn.Linear(student_dim, teacher_dim)

    def _embed_student(self, student, student_key):
        with torch.autocast(device_type=student.device.type, enabled=False):
            s = F.normalize(self.projection(student.float()), dim=1)
        return s, self.teacher_queue, None


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

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, student_key: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> torch.Tensor:
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
    mask_self: bool = True,
) -> nn.Module:
    """The loss module for a ``--method`` name (one of ``METHODS``)."""
    if method not in METHODS:
        raise TrainingError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if method.startswith("compress-"):
        cls = CompRess1Q if method == "compress-1q" else CompRess2Q
        return cls(teacher_dim, student_dim, queue_size, temperature, student_temperature, mask_self=mask_self)
    return RegressionLoss(teacher_dim, student_dim, batch_norm=method == "regression-bn")


def uses_momentum_encoder(method: str) -> bool:
    return method == "compress-2q"


def commit_queues(module: nn.Module) -> None:
    """Write the pending keys of every queue loss inside ``module`` (after backward)."""
    for m in module.modules():
        if isinstance(m, QueueLoss):
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


class MoCoLoss(QueueLoss):
    """MoCo v2's InfoNCE with a queue of negative keys (X. Chen et al., "Improved Baselines with
    Momentum Contrastive Learning", 2020).

    q: (B, D) queries from the encoder, k: (B, D) keys of the other view from the momentum encoder,
    index (B,) the images' dataset indices. logits = [q.k, q.queue] / T, target 0. With
    ``mask_self``, a queued key of the query's own image is not used as a negative (a queue that holds
    the whole data set holds one for every image). Keys are enqueued in ``commit()`` after backward.
    """

    def __init__(self, dim: int, queue_size: int = 65_536, temperature: float = 0.2, mask_self: bool = True):
        super().__init__(mask_self)
        self.temperature = float(temperature)
        self.queue = RingQueue(queue_size, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        self.commit()
        with torch.autocast(device_type=q.device.type, enabled=False):
            q = F.normalize(q.float(), dim=1)
            k = F.normalize(k.detach().float(), dim=1)
            pos = (q * k).sum(dim=1, keepdim=True)
            negatives = q @ self.queue.anchors().T
            mask = self.mask_for(self.queue, index)
            if mask is not None:
                negatives = negatives.masked_fill(mask, MASKED_LOGIT)
            logits = torch.cat([pos, negatives], dim=1) / self.temperature
            loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        self.stage(self.queue, k, index)
        return loss
