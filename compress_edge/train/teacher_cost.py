"""What a live teacher costs a distillation on a CPU, and when a teacher cache would pay.

With a live teacher, ``distill`` runs it on every step; a teacher cache (``compress-edge cache-teacher
--views K``) runs it K times per image, once, and each step then costs only the student. On the first
steps of a run the teacher's forward pass is timed against the whole step (:class:`TeacherClock`);
when a cache would shorten the run by at least a quarter and by five minutes (and take at most half
the free disk space), ``distill`` says so,
with the two commands and both estimates, and records the figures in ``quality.json``
(``teacher_cost``). A cache changes what the student sees (K recorded views of each image instead of
a new one each epoch), so it is a suggestion, not a switch.

Timed on a CPU only: a GPU runs asynchronously, and a timer around its calls measures the launch of
the work, not the work.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Steps timed, after a first one that warms up (allocations, the data loader's start).
TIMED_STEPS = 8
#: A cache is suggested when it would save at least this share of the run ...
HINT_SHARE = 0.25
#: ... and at least this many seconds.
HINT_SECONDS = 300.0
#: Views per image the suggested cache records: on the held-out textures (README, "When a cache pays")
#: a 16-view cache's student was level with the live teacher's, a 4-view one's 3 points behind.
CACHE_VIEWS = 16


class TeacherClock:
    """Sums the teacher's forward time over :data:`TIMED_STEPS` steps and the wall time of the same
    steps (from the start of one step's teacher call to the next's), then calls
    ``report(teacher_seconds_per_step, seconds_per_step)`` once."""

    def __init__(self, report: Callable[[float, float], None], steps: int | None = None):
        self.report = report
        self.steps = steps or TIMED_STEPS
        self.calls = 0
        self.begin = 0.0  # the start of the second call: the first timed step
        self.teacher = 0.0

    def record(self, start: float, end: float) -> None:
        """One teacher call, from ``start`` to ``end`` (``time.perf_counter`` seconds)."""
        self.calls += 1
        if self.calls == 2:
            self.begin = start
        if 2 <= self.calls <= self.steps + 1:
            self.teacher += end - start
        elif self.calls == self.steps + 2:  # this call's start ends the last timed step
            self.report(self.teacher / self.steps, (start - self.begin) / self.steps)


def cache_estimate(teacher_s: float, step_s: float, *, steps_left: int, images: int, batch_size: int, dim: int,
                   free_bytes: int | None = None, views: int = CACHE_VIEWS) -> dict[str, Any]:
    """The rest of the run with the live teacher, and with a cache of ``views`` views of each of
    ``images`` images (the teacher's time per image taken from its time per training batch), whose
    ``dim``-float embeddings are stored float16; suggested only when it would take at most half of
    ``free_bytes`` (the disk space where it would go, when known)."""
    live = steps_left * step_s
    cache = views * images * teacher_s / max(1, batch_size)
    cached = steps_left * max(0.0, step_s - teacher_s) + cache
    cache_bytes = 2 * views * images * dim
    fits = free_bytes is None or cache_bytes <= free_bytes / 2
    return {"teacher_seconds_per_step": round(teacher_s, 4), "seconds_per_step": round(step_s, 4),
            "teacher_share": round(teacher_s / step_s, 3) if step_s > 0 else None, "steps_left": int(steps_left),
            "live_seconds": round(live, 1), "views": views, "cache_seconds": round(cache, 1),
            "cached_seconds": round(cached, 1), "cache_bytes": cache_bytes,
            "suggest_cache": fits and live - cached >= max(HINT_SHARE * live, HINT_SECONDS)}


def cache_commands(*, data: str, teacher: str, teacher_weights: str | None, image_size: int | None, out: str,
                   views: int = CACHE_VIEWS) -> tuple[str, str]:
    """The ``cache-teacher`` and ``distill`` commands that replace a live teacher by a cache (a new run
    folder beside ``out``: that one holds this run)."""
    cache = str(Path(out).parent / "teacher-cache")
    parts = ["compress-edge", "cache-teacher", data, "--teacher", teacher]
    if teacher_weights:
        parts += ["--teacher-weights", teacher_weights]
    if image_size:
        parts += ["--image-size", str(image_size)]
    parts += ["--views", str(views), "--out", cache]
    distill = ["compress-edge", "distill", data, "--teacher-cache", cache, "--out", f"{out}-cached"]
    return shlex.join(parts), shlex.join(distill)


def teacher_cost_check(teacher_s: float, step_s: float, *, run_dir: Path, steps_left: int, images: int,
                       batch_size: int, dim: int, commands: tuple[str, str], views: int = CACHE_VIEWS
                       ) -> dict[str, Any]:
    """Estimate, record in quality.json and, when a cache would pay, say so (see the module docstring).
    ``views`` as cache-teacher's ``--views``: 0 for the centre view, K for K augmented views."""
    import shutil

    from compress_edge.eval.profile import human_bytes
    from compress_edge.eval.quality import record_quality
    from compress_edge.progress import format_duration

    record = cache_estimate(teacher_s, step_s, steps_left=steps_left, images=images, batch_size=batch_size, dim=dim,
                            free_bytes=shutil.disk_usage(run_dir).free, views=max(1, views))
    if record["suggest_cache"]:
        record["commands"] = list(commands)
        what = ("once for the centre view of each image (the same target it gets now" if views == 0 else
                f"once for {views} recorded views of each image (the student then sees those views instead of a "
                "new one each epoch")
        logger.info(
            "the live teacher takes %.0f %% of each training step here (%.2f of %.2f s): about %s left; a teacher "
            "cache runs it %s; %s on disk), about %s in all: %s, then %s (with this run's other options)",
            100 * record["teacher_share"], teacher_s, step_s, format_duration(record["live_seconds"]),
            what, human_bytes(record["cache_bytes"]), format_duration(record["cached_seconds"]),
            commands[0], commands[1])
    record_quality(run_dir, "teacher_cost", record)
    return record
