"""What a CompRess step costs beyond the work it cannot avoid (numbers, not a test).

For each method: the time of one distillation step with a cached teacher (mobilenet_v2 student,
64 px, batch 64, teacher dim 512, queue 16,384), through the real training engine's step, divided
by the time of the work the method cannot avoid on the same batch: a plain forward + backward + SGD
step of the same student, plus one forward of the key encoder for compress-2q. Goal: <= 1.25 on a
CPU. Also the extra memory the method holds against the size of its queues (goal: <= 1.5x): every tensor the task holds between
steps beyond the student (queues, key encoder, projection) plus the optimiser state of non-student
parameters, counted exactly. (The per-step logits, a few B x K float32 matrices, come and go.) With a GPU: images/s of the default
method with and without mixed precision.

    python benchmarks/bench_distill.py            # the issue's setting
    python benchmarks/bench_distill.py --quick    # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

METHODS = ["compress-2q", "compress-2q-nomomentum", "compress-1q", "regression", "regression-bn"]


def _setup(method: str, args, device: str, amp: str = "off"):
    import torch

    from compress_edge.models.resolve import SMALL_INPUT_MAX, create_model
    from compress_edge.train.config import TrainConfig
    from compress_edge.train.distill import DistillTask
    from compress_edge.train.engine import Trainer
    from compress_edge.train.losses import build_loss, uses_momentum_encoder

    torch.manual_seed(0)
    student = create_model("mobilenet_v2", small_input=args.image_size <= SMALL_INPUT_MAX)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    teacher = torch.nn.functional.normalize(torch.randn(args.batch, args.teacher_dim), dim=1)
    batch = (images, teacher, torch.arange(args.batch))
    if method == "plain":
        return student, batch, None
    criterion = build_loss(method, args.teacher_dim, student.embed_dim, queue_size=args.queue)
    for q in ("teacher_queue", "student_queue"):  # full queues: the steady-state cost
        if hasattr(criterion, q):
            queue = getattr(criterion, q)
            for _ in range(0, queue.size, 1024):  # in chunks: no queue-sized temporary in the peak RSS
                queue.push(torch.nn.functional.normalize(torch.randn(1024, queue.dim), dim=1))
    task = DistillTask(student, criterion, momentum_encoder=uses_momentum_encoder(method))
    config = TrainConfig(epochs=1, batch_size=args.batch, lr=0.1, warmup_epochs=0.0, device=device, amp=amp, progress=False, workers=0)
    trainer = Trainer(task, config, "/tmp/compress-edge-bench-distill")
    scheduler = trainer._make_scheduler(1000)
    trainer.task.train()
    return trainer, batch, scheduler


def _time(fn, steps: int, warmup: int, sync) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _plain_step(student, images):
    """A plain forward + backward + SGD step of ``student`` on ``images``, as a callable."""
    import torch

    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    # A real target: the squared norm of an L2-normalised output is constant, and its ~0
    # gradients run through backward as denormal floats, many times slower on a CPU.
    target = torch.nn.functional.normalize(torch.randn(images.shape[0], student.embed_dim), dim=1)

    def step():
        opt.zero_grad(set_to_none=True)
        (student(images) * target).sum(dim=1).mean().neg().backward()
        opt.step()

    return step


def measure(method: str, args, device: str = "cpu", amp: str = "off") -> dict:
    """Median step seconds of ``method`` ('plain' and 'key-forward' are the baselines)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if method in ("plain", "key-forward"):
        student, batch, _ = _setup("plain", args, device)
        student = student.to(device).train()
        images = batch[0].to(device)
        if method == "plain":
            step = _plain_step(student, images)
        else:

            def step():
                with torch.no_grad():
                    student(images)
    else:
        trainer, batch, scheduler = _setup(method, args, device, amp)

        def step():
            trainer._step(batch, scheduler)

    times = _time(step, args.steps, args.warmup, sync)
    return {"method": method, "median_s": statistics.median(times)}


def measure_interleaved(method: str, args) -> dict:
    """Method step and its unavoidable work timed alternately in one process, so that a machine
    whose load drifts slows both alike; medians of each. Peak RSS is taken before the baselines
    are built (the method's own memory)."""
    import copy

    import torch

    trainer, batch, scheduler = _setup(method, args, "cpu")
    student = copy.deepcopy(trainer.task.student).train()
    images = batch[0]
    student_step = _plain_step(student, images)
    key = copy.deepcopy(student)

    def plain():
        student_step()
        if method == "compress-2q":
            with torch.no_grad():
                key(images)

    for _ in range(args.warmup):
        plain()
        trainer._step(batch, scheduler)
    t_plain, t_method = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        plain()
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer._step(batch, scheduler)
        t_method.append(time.perf_counter() - t0)
    return {"method": method, "median_s": statistics.median(t_method), "unavoidable_s": statistics.median(t_plain),
            "held_extra_bytes": held_extra_bytes(trainer)}


def held_extra_bytes(trainer) -> int:
    """Bytes the method keeps between steps beyond a plain student: every tensor of the task outside
    the student (queues, key encoder, projection, batch-norm buffers) and the optimiser state of the
    parameters that are not the student's."""
    task = trainer.task
    student = {id(t) for t in list(task.student.parameters()) + list(task.student.buffers())}
    extra = [t for t in list(task.parameters()) + list(task.buffers()) if id(t) not in student]
    total = sum(t.numel() * t.element_size() for t in extra)
    for p, state in trainer.optimizer.state.items():
        if id(p) not in student:
            total += sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel"))
    return total


def _queue_bytes(method: str, args) -> int:
    from compress_edge.models.resolve import create_model
    from compress_edge.train.losses import build_loss

    dim = create_model("mobilenet_v2", small_input=True).embed_dim
    crit = build_loss(method, args.teacher_dim, dim, queue_size=args.queue)
    return sum(b.numel() * b.element_size() for n, b in crit.named_buffers() if n.endswith("bank"))


def _in_subprocess(method: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", method, "--batch", str(args.batch), "--image-size", str(args.image_size),
           "--queue", str(args.queue), "--teacher-dim", str(args.teacher_dim), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--queue", type=int, default=16384)
    p.add_argument("--teacher-dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="batch 16, 32 px, queue 2048, 5 steps")
    p.add_argument("--json", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.batch, args.image_size, args.queue, args.steps = 16, 32, 2048, 5
    if args.one:
        import torch

        torch.set_flush_denormal(True)  # the same for the method and its baseline; denormals are noise here
        result = measure_interleaved(args.one, args) if args.one in METHODS else measure(args.one, args)
        print(json.dumps(result))
        return

    import torch

    base = {m: _in_subprocess(m, args) for m in ("plain", "key-forward")}
    rows = []
    for method in METHODS:
        r = _in_subprocess(method, args)
        unavoidable = r["unavoidable_s"]  # measured beside the method's steps, in its process
        queue_mb = _queue_bytes(method, args) / 2**20
        extra_mb = r["held_extra_bytes"] / 2**20
        rows.append({
            "method": method, "step_ms": 1000 * r["median_s"], "unavoidable_ms": 1000 * unavoidable,
            "ratio": r["median_s"] / unavoidable, "queues_mb": queue_mb, "extra_mb": extra_mb,
            "extra_over_queues": extra_mb / queue_mb if queue_mb else float("nan"),
        })
    gpu = []
    if torch.cuda.is_available():
        for amp in ("off", "auto"):
            r = measure("compress-2q", args, device="cuda", amp=amp)
            gpu.append({"amp": amp, "images_per_s": args.batch / r["median_s"]})
    result = {
        "setting": {"student": "mobilenet_v2", "image_size": args.image_size, "batch": args.batch,
                    "teacher_dim": args.teacher_dim, "queue": args.queue, "threads": torch.get_num_threads()},
        "baseline_ms": {k: 1000 * v["median_s"] for k, v in base.items()},
        "methods": rows, "gpu": gpu,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    s = result["setting"]
    print(f"student mobilenet_v2 {s['image_size']} px, batch {s['batch']}, teacher dim {s['teacher_dim']}, "
          f"queue {s['queue']}, {s['threads']} threads")
    print(f"plain step {result['baseline_ms']['plain']:.1f} ms, key-encoder forward "
          f"{result['baseline_ms']['key-forward']:.1f} ms")
    print(f"{'method':<24}{'step ms':>9}{'unavoid. ms':>12}{'ratio':>7}{'queues MB':>11}{'extra MB':>10}{'extra/q':>8}")
    for r in rows:
        print(f"{r['method']:<24}{r['step_ms']:>9.1f}{r['unavoidable_ms']:>12.1f}{r['ratio']:>7.2f}"
              f"{r['queues_mb']:>11.1f}{r['extra_mb']:>10.1f}{r['extra_over_queues']:>8.2f}")
    for g in gpu:
        print(f"GPU compress-2q amp={g['amp']}: {g['images_per_s']:.0f} images/s")


if __name__ == "__main__":
    main()
