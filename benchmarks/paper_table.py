"""The CompRess paper's Table 1 at small scale, with the two baselines a user thinks of first.

For one data set, every row is measured on the same gallery (the training images) and queries (the
test images), with frozen embeddings:

- the teacher;
- raw pixels (plain cosine kNN on the images' pixels, no model);
- the student architecture with random weights, batch-norm statistics re-estimated on the data;
- the student trained self-supervised from scratch (SimCLR, the same number of epochs);
- the student distilled from the teacher with ``regression``, ``regression-bn``, ``compress-1q`` and
  ``compress-2q``, each with the same epochs and batch (and each method's automatic learning rate).

Columns: 1-NN and weighted 20-NN top-1 (%), linear probe top-1 (%), the spread of the test
embeddings (mean pairwise cosine, effective rank), the top-10 neighbour overlap with the teacher,
parameters, FLOPs (fvcore: one multiply-add is one FLOP), embedding size and train time.

Data sets:

- ``fashion-mnist``: the demo's split (``fashion-mnist:train@20000``, ``fashion-mnist:test@2000``),
  the teacher shipped with the package (made by ``compress-edge pretrain``; ``--teacher pretrain``
  trains one here instead), resnet18 at 64 px; students mobilenet_v2 x0.5 at 32 px.
- ``shapes``: ten classes of coloured shapes on clutter, generated here with a fixed seed
  (``compress_edge.data.synthetic``), 32 px; the teacher is a torchvision resnet18 trained here with
  the training labels (20 epochs) and brought to ``distill`` as a user brings a checkpoint
  (``--teacher pretrain``: pretrained here with ``compress-edge pretrain``'s defaults instead); the
  students learn without labels.

    python benchmarks/paper_table.py --dataset fashion-mnist     # ~90 min on 2 CPU cores
    python benchmarks/paper_table.py --dataset shapes --jobs 2 --threads 1   # distill's automatic plan
    python benchmarks/paper_table.py --dataset shapes --quick    # minutes: a smoke run

The Fashion-MNIST preset trains every student the demo's 10 epochs (batch 256); the shapes preset
gives every student, the from-scratch one included, the epochs and batch that ``distill`` chooses
by itself for the training set (``--epochs`` overrides). ``--jobs N`` trains N students at a time,
each with ``--threads`` torch threads.

Prints the table and writes ``results.json`` and ``table.md`` in ``--work`` (default
``runs/paper-table-<dataset>``); finished runs are reused when the script runs again with the same
settings (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("paper_table")

DISTILL_METHODS = ("regression", "regression-bn", "compress-1q", "compress-2q")


@dataclass
class Setting:
    """One benchmark configuration."""

    dataset: str
    train: str  # DATA of the training images (the gallery)
    test: str  # DATA of the queries
    teacher: str  # "shipped", "pretrain" (SimCLR here) or "supervised" (trained here with the train labels)
    teacher_arch: str
    teacher_kwargs: dict[str, Any]
    teacher_image_size: int
    teacher_epochs: int | None  # pretrain: None is pretrain's automatic run length; supervised: epochs
    student_arch: str
    student_kwargs: dict[str, Any]
    student_image_size: int
    embed_dim: int
    epochs: int | None  # every student, the from-scratch one included; None: distill's automatic run length
    batch_size: int | None  # None: distill's automatic batch
    cache_views: int
    threads: int | None = None
    workers: int = 1
    device: str = "auto"
    seed: int = 0
    generated: dict[str, Any] = field(default_factory=dict)  # shapes: images per class, size, seeds


PRESETS = {
    "fashion-mnist": Setting(
        dataset="fashion-mnist", train="fashion-mnist:train@20000", test="fashion-mnist:test@2000",
        teacher="shipped", teacher_arch="resnet18", teacher_kwargs={"small_input": False}, teacher_image_size=64,
        teacher_epochs=None, student_arch="mobilenet_v2", student_kwargs={"width_mult": 0.5, "small_input": True},
        student_image_size=32, embed_dim=128, epochs=10, batch_size=256, cache_views=4,
    ),
    "shapes": Setting(
        dataset="shapes", train="", test="", teacher="supervised", teacher_arch="resnet18",
        teacher_kwargs={"small_input": False}, teacher_image_size=32, teacher_epochs=20,
        student_arch="mobilenet_v2", student_kwargs={"width_mult": 0.5, "small_input": False},
        student_image_size=32, embed_dim=128, epochs=None, batch_size=None, cache_views=4,
        generated={"train_per_class": 500, "test_per_class": 100, "size": 32, "seed": 0},
    ),
}


def quick(s: Setting) -> Setting:
    """A smoke-run version of a setting: few images, few epochs."""
    s = dataclasses.replace(s, epochs=2, batch_size=64, cache_views=2, teacher_epochs=2)
    if s.dataset == "fashion-mnist":
        return dataclasses.replace(s, train="fashion-mnist:train@1000", test="fashion-mnist:test@300")
    return dataclasses.replace(s, generated={**s.generated, "train_per_class": 40, "test_per_class": 20})


# --------------------------------------------------------------------------------------------------
# stages, each reused when its folder says it finished with the same options
# --------------------------------------------------------------------------------------------------
def _reuse(run: Path, options: dict) -> dict | None:
    marker = run / "benchmark-done.json"
    if not marker.is_file():
        if run.exists():
            import shutil

            log.info("%s holds an unfinished run: starting it again", run)
            shutil.rmtree(run)
        return None
    record = json.loads(marker.read_text())
    if record.get("options") != json.loads(json.dumps(options, default=str)):
        raise SystemExit(f"{run} was made with other settings: delete it or pick another --work")
    log.info("reusing %s", run)
    return record


def _done(run: Path, options: dict, seconds: float, **extra) -> dict:
    record = {"seconds": round(seconds, 1), "options": json.loads(json.dumps(options, default=str)), **extra}
    run.mkdir(parents=True, exist_ok=True)
    (run / "benchmark-done.json").write_text(json.dumps(record))
    return record


def make_data(s: Setting, work: Path) -> Setting:
    """Generate the shapes images (once); returns the setting with its train/test DATA filled in."""
    if s.dataset != "shapes":
        return s
    from compress_edge.data.synthetic import make_shapes

    g = s.generated
    root = work / "data"
    options = {"generated": g}
    if _reuse(root, options) is None:
        started = time.perf_counter()
        make_shapes(root / "train", g["train_per_class"], size=g["size"], seed=g["seed"])
        make_shapes(root / "test", g["test_per_class"], size=g["size"], seed=g["seed"] + 1)
        _done(root, options, time.perf_counter() - started)
    return dataclasses.replace(s, train=str(root / "train"), test=str(root / "test"))


def resolve_plan(s: Setting) -> Setting:
    """Fill an automatic (None) epochs or batch with what ``distill`` would choose for the training set,
    so that every student, the SimCLR one included, trains the same epochs with the same batch."""
    if s.epochs is not None and s.batch_size is not None:
        return s
    from compress_edge.data.datasets import open_dataset
    from compress_edge.defaults import DISTILL_PLAN_LIMITS
    from compress_edge.train.schedule import plan_run

    plan = plan_run(len(open_dataset(s.train)), batch_size=s.batch_size, epochs=s.epochs, lr=None,
                    **DISTILL_PLAN_LIMITS)
    log.info("distill's plan for %d images: %d epochs of %d steps, batch %d", plan.images, plan.epochs,
             plan.steps_per_epoch, plan.batch_size)
    return dataclasses.replace(s, epochs=plan.epochs, batch_size=plan.batch_size)


def _train_config(s: Setting, epochs: int | None, batch: int | None, amp: str = "off"):
    from compress_edge.train.config import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=batch, lr=None, warmup_epochs=None, workers=s.workers,
                       device=s.device, amp=amp, seed=s.seed, progress=False, log_every=50)


def _reuse_or_run(out: Path, opts: Any, run: Any) -> dict:
    """The record of the run in ``out`` if it ran with ``opts``, else run it (``run(opts)``) and record it."""
    if (record := _reuse(out, opts.to_dict())) is not None:
        return record
    started = time.perf_counter()
    result = run(opts)
    return _done(out, opts.to_dict(), time.perf_counter() - started, epochs=result.epochs_done,
                 steps=result.global_step)


def pretrain(s: Setting, data: str, out: Path, arch: str, kwargs: dict, image_size: int, epochs: int | None,
             batch: int | None, amp: str = "off") -> dict:
    from compress_edge.train.pretrain import PretrainOptions, run_pretrain

    opts = PretrainOptions(data=data, out=str(out), arch=arch, arch_kwargs=dict(kwargs), image_size=image_size,
                           holdout=0.0, train=_train_config(s, epochs, batch, amp))
    return _reuse_or_run(out, opts, run_pretrain)


def teacher(s: Setting, work: Path) -> tuple[str, dict]:
    """(the teacher's model folder, its record)."""
    if s.teacher == "shipped":
        from compress_edge.demo import shipped_teacher

        return str(shipped_teacher()), {"seconds": 0.0, "shipped": True}
    if s.teacher == "supervised":
        return supervised_teacher(s, work)
    out = work / "teacher"
    record = pretrain(s, s.train, out, s.teacher_arch, s.teacher_kwargs, s.teacher_image_size, s.teacher_epochs,
                      None, amp="bf16" if s.device != "cuda" else "auto")
    return str(out / "student"), record


def supervised_teacher(s: Setting, work: Path) -> tuple[str, dict]:
    """A torchvision resnet18 trained with the training images' labels, saved as the plain state dict a
    user brings (``--teacher resnet18 --teacher-weights FILE``), then opened the way ``distill`` opens it."""
    from compress_edge.data.synthetic import train_labelled_teacher
    from compress_edge.models.resolve import resolve_model, save_model

    if s.teacher_arch != "resnet18":
        raise SystemExit("a supervised teacher is a torchvision resnet18 here")
    out = work / "teacher-supervised"
    options = {"kwargs": s.teacher_kwargs, "image_size": s.teacher_image_size, "epochs": s.teacher_epochs,
               "seed": s.seed, "train": s.train}
    if (record := _reuse(out, options)) is None:
        started = time.perf_counter()
        weights = train_labelled_teacher(s.train, out / "teacher.pth", image_size=s.teacher_image_size,
                                         epochs=s.teacher_epochs or 30, seed=s.seed,
                                         small_input=bool(s.teacher_kwargs.get("small_input", False)))
        model, spec = resolve_model("resnet18", weights=str(weights), image_size=s.teacher_image_size)
        save_model(model, spec, out / "model")
        record = _done(out, options, time.perf_counter() - started)
    return str(out / "model"), record


def teacher_cache(s: Setting, teacher_dir: str, work: Path) -> tuple[str, float]:
    from compress_edge.train.distill import cache_teacher

    out = work / "teacher-cache"
    started = time.perf_counter()
    cache_teacher(s.train, out, teacher=teacher_dir, views=s.cache_views, workers=s.workers, device=s.device,
                  progress=False, seed=s.seed)
    return str(out), time.perf_counter() - started


def distill(s: Setting, teacher_dir: str, cache: str, method: str, out: Path) -> dict:
    from compress_edge.train.distill import DistillOptions, run_distill

    opts = DistillOptions(data=s.train, out=str(out), teacher=teacher_dir, teacher_cache=cache,
                          student_arch=s.student_arch, student_kwargs=dict(s.student_kwargs),
                          student_image_size=s.student_image_size, embed_dim=s.embed_dim, method=method,
                          holdout=0.0, train=_train_config(s, s.epochs, s.batch_size))
    return _reuse_or_run(out, opts, run_distill)


# --------------------------------------------------------------------------------------------------
# evaluation: one function for every row
# --------------------------------------------------------------------------------------------------
def evaluate_features(name: str, train_feats, test_feats, s: Setting, teacher_test=None) -> dict:
    from compress_edge.eval.agreement import neighbor_agreement
    from compress_edge.eval.knn import knn_eval
    from compress_edge.eval.linear import linear_probe
    from compress_edge.eval.quality import embedding_spread

    (xtr, ytr), (xte, yte) = train_feats, test_feats
    knn = knn_eval(xtr, ytr, xte, yte, ks=(20,), device=s.device)
    linear = linear_probe(xtr, ytr, xte, yte, device=s.device, seed=s.seed)
    agree = (neighbor_agreement(teacher_test, xte, ks=(10,), max_queries=None, device=s.device)
             if teacher_test is not None else None)
    spread = embedding_spread(xte)
    return {"row": name, "nn": knn.nn_top1, "knn20": knn.knn[20]["top1"], "linear": linear.top1,
            "mean_cosine": spread.mean_cosine, "effective_rank": spread.effective_rank, "dim": int(xte.shape[1]),
            "overlap10": agree.overlap[10] if agree else None}


def model_features(model_dir: str | None, s: Setting, train_ds, test_ds, *, model=None, spec=None):
    from compress_edge.eval.features import extract_features
    from compress_edge.models.resolve import load_model

    if model is None:
        model, spec = load_model(model_dir)
    kw = dict(spec=spec, device=s.device, workers=s.workers, use_cache=False, progress=False)
    return extract_features(model, train_ds, **kw), extract_features(model, test_ds, **kw), model, spec


def cost(model, spec) -> dict:
    from compress_edge.eval.profile import profile_model

    prof = profile_model(model, spec.image_size, depth=0)
    return {"params": prof.params, "flops": prof.flops}


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import torch
    from machine import cpu_model  # benchmarks/machine.py (scripts run with benchmarks/ on the path)

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| row | 1-NN | 20-NN | linear | mean cos | eff. rank | dim | overlap@10 | params | MFLOPs | train |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        params = "-" if r.get("params") is None else f"{r['params'] / 1e6:.2f} M"
        flops = "-" if r.get("flops") is None else f"{r['flops'] / 1e6:.1f}"
        train = "-" if r.get("train_seconds") is None else f"{r['train_seconds'] / 60:.1f} min"
        lines.append(f"| {r['row']} | {_pct(r['nn'])} | {_pct(r['knn20'])} | {_pct(r['linear'])} "
                     f"| {r['mean_cosine']:.3f} | {r['effective_rank']:.1f} | {r['dim']} | {_pct(r['overlap10'])} "
                     f"| {params} | {flops} | {train} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> dict[str, Any]:
    """Is distill's default method at or above every baseline and within 3 points of the teacher?"""
    from compress_edge.defaults import DEFAULT_METHOD

    by = {r["row"]: r for r in rows}
    name = f"student: {DEFAULT_METHOD}"
    main = by[name]
    others = [r for r in rows if r["row"] not in ("teacher", name)]
    gaps = {r["row"]: round(100 * (main["knn20"] - r["knn20"]), 2) for r in others}
    return {"metric": "weighted 20-NN", "method": DEFAULT_METHOD, "default_minus": gaps,
            "teacher_gap": round(100 * (by["teacher"]["knn20"] - main["knn20"]), 2),
            "beats_every_baseline": all(g >= 0 for g in gaps.values()),
            "within_3_of_teacher": by["teacher"]["knn20"] - main["knn20"] <= 0.03}


STUDENTS = ("scratch", *DISTILL_METHODS)


def train_student(s: Setting, teacher_dir: str, cache: str, work: Path, name: str) -> dict:
    """Train (or reuse) one student: ``scratch`` (SimCLR) or a distillation method."""
    if name == "scratch":
        return pretrain(s, s.train, work / "student-scratch", s.student_arch, s.student_kwargs,
                        s.student_image_size, s.epochs, s.batch_size)
    record = distill(s, teacher_dir, cache, name, work / f"student-{name}")
    log.info("%s trained in %.0f s", name, record["seconds"])
    return record


def _worker_start(threads: int | None) -> None:
    """A training process: its log lines, and ``--threads`` torch threads (``run`` sets the main one's)."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s",
                        stream=sys.stderr)


def train_students(s: Setting, teacher_dir: str, cache: str, work: Path, jobs: int, on_done) -> dict[str, dict]:
    """Every student's record; ``jobs`` students train at a time (separate processes, the SimCLR one
    first: it is the longest), ``on_done(name, record)`` after each."""
    records: dict[str, dict] = {}
    if jobs <= 1:
        for name in STUDENTS:
            records[name] = train_student(s, teacher_dir, cache, work, name)
            on_done(name, records[name])
        return records
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_start, initargs=(s.threads,)) as pool:
        futures = {pool.submit(train_student, s, teacher_dir, cache, work, name): name for name in STUDENTS}
        for future in as_completed(futures):
            name = futures[future]
            records[name] = future.result()
            on_done(name, records[name])
    return records


def run(s: Setting, work: Path, jobs: int = 1) -> dict:
    import torch

    from compress_edge.data.datasets import open_dataset
    from compress_edge.eval.quality import random_weights_model, raw_pixel_features
    from compress_edge.models.resolve import load_model

    if s.threads:
        torch.set_num_threads(int(s.threads))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    s = resolve_plan(make_data(s, work))
    results: dict[str, Any] = {"setting": dataclasses.asdict(s), "machine": machine(), "rows": [], "stages": {}}

    def save() -> None:
        results["total_seconds"] = round(time.perf_counter() - started, 1)
        (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    teacher_dir, t_record = teacher(s, work)
    results["stages"]["teacher"] = t_record
    cache, cache_seconds = teacher_cache(s, teacher_dir, work)
    results["stages"]["teacher_cache_seconds"] = round(cache_seconds, 1)
    save()

    def student_done(name: str, record: dict) -> None:
        results["stages"][f"student-{name}"] = record
        save()

    records = train_students(s, teacher_dir, cache, work, jobs, on_done=student_done)
    trained = [("student: SimCLR from scratch", work / "student-scratch" / "student", records["scratch"], 0.0)]
    trained += [(f"student: {m}", work / f"student-{m}" / "student", records[m], cache_seconds)
                for m in DISTILL_METHODS]

    train_ds, test_ds = open_dataset(s.train), open_dataset(s.test)
    t_train, t_test, t_model, t_spec = model_features(teacher_dir, s, train_ds, test_ds)
    rows = [{**evaluate_features("teacher", t_train, t_test, s), **cost(t_model, t_spec),
             "train_seconds": t_record.get("seconds")}]
    teacher_test = t_test[0]
    size = s.student_image_size
    raw = ((raw_pixel_features(train_ds, size), train_ds.labels), (raw_pixel_features(test_ds, size), test_ds.labels))
    rows.append(evaluate_features("raw pixels", *raw, s, teacher_test))
    _, s_spec = load_model(trained[-1][1])
    twin = random_weights_model(s_spec, train_ds, seed=s.seed)
    r_train, r_test, _, _ = model_features(None, s, train_ds, test_ds, model=twin, spec=s_spec)
    rows.append({**evaluate_features("student: random weights", r_train, r_test, s, teacher_test),
                 **cost(twin, s_spec)})
    for name, folder, record, extra in trained:
        f_train, f_test, model, spec = model_features(str(folder), s, train_ds, test_ds)
        rows.append({**evaluate_features(name, f_train, f_test, s, teacher_test), **cost(model, spec),
                     "train_seconds": record["seconds"] + extra})
        log.info("%s: 1-NN %.1f, 20-NN %.1f", name, 100 * rows[-1]["nn"], 100 * rows[-1]["knn20"])
    results["rows"] = rows
    results["verdict"] = verdict(rows)
    with contextlib.suppress(OSError):
        results["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results["markdown"] = markdown_table(rows)
    (work / "table.md").write_text(results["markdown"] + "\n")
    save()
    return results


def print_table(results: dict) -> None:
    s, v = results["setting"], results["verdict"]
    print(f"CompRess at small scale on {s['dataset']}: gallery {s['train']}, queries {s['test']}; accuracies in %")
    print(results["markdown"])
    print(f"{v['method']} (distill's default) vs the others (weighted 20-NN points): {v['default_minus']}; "
          f"{v['teacher_gap']:+.1f} points behind the teacher")
    print(f"goal (at or above every baseline, within 3 points of the teacher): "
          f"{'met' if v['beats_every_baseline'] and v['within_3_of_teacher'] else 'NOT met'}")
    print(f"total {results['total_seconds'] / 60:.1f} min on {results['machine']['cpu']} "
          f"({results['machine']['cores']} cores, GPU: {results['machine']['gpu']})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(PRESETS), default="fashion-mnist")
    p.add_argument("--quick", action="store_true", help="a smoke run: few images, two epochs")
    p.add_argument("--teacher", choices=("shipped", "pretrain", "supervised"), default=None,
                   help="the teacher: the package's (fashion-mnist), pretrained here with SimCLR (hours on a CPU), "
                   "or trained here with the training labels (default: the preset's)")
    p.add_argument("--work", type=Path, default=None, help="folder for data, runs and results "
                   "(default: runs/paper-table-<dataset>[-quick])")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every student")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--jobs", type=int, default=1, help="students trained at a time, each with --threads threads")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes")
    p.add_argument("--device", default=None, help="auto, cpu, cuda")
    args = p.parse_args(argv)
    s = PRESETS[args.dataset]
    if args.quick:
        s = quick(s)
    if args.teacher == "shipped" and s.dataset != "fashion-mnist":
        p.error("--teacher shipped: the package ships a Fashion-MNIST teacher only")
    if args.teacher:
        s = dataclasses.replace(s, teacher=args.teacher)
    for name in ("epochs", "threads", "workers", "device"):
        if getattr(args, name) is not None:
            s = dataclasses.replace(s, **{name: getattr(args, name)})
    work = args.work or Path("runs") / f"paper-table-{args.dataset}{'-quick' if args.quick else ''}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    print_table(run(s, work, jobs=max(1, args.jobs)))


if __name__ == "__main__":
    main()
