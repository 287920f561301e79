"""The CompRess paper's Table 1 at small scale, on Fashion-MNIST.

Pretrains a self-supervised teacher, then trains the same student architecture five ways with the
same number of epochs: self-supervised from scratch (the teacher's method), ``regression``,
``regression-bn``, ``compress-2q`` and ``compress-1q`` (distilled from the teacher); evaluates the
teacher and every student with frozen features: linear probe top-1, 1-NN top-1 (the paper's "NN"),
weighted 20-NN, cluster alignment (k-means, Hungarian matching); parameters and FLOPs (fvcore: one
multiply-add is one FLOP). Prints the table, writes ``results.json`` and ``table.md`` in ``--work``.

    python benchmarks/paper_table.py --quick          # CPU, minutes: 4,000 training images, few epochs
    python benchmarks/paper_table.py --full           # a GPU: all 60,000 images, paper-like epochs

Every setting can be overridden (``--train-images``, ``--epochs``, ...; see ``--help``). Finished
stages are reused when the script is run again with the same ``--work`` folder (delete it to start
over). The gallery of the kNN and the training split of the linear probe and of k-means is the
training data (``fashion-mnist:train@4000`` in ``--quick``); the queries are fashion-mnist:test
(``fashion-mnist:test@2000`` in ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("paper_table")

STUDENT_METHODS = ("regression", "regression-bn", "compress-2q", "compress-1q")


@dataclass
class Setting:
    """One benchmark configuration (``--quick`` / ``--full`` presets, then command-line overrides)."""

    name: str
    train_images: int | None  # None: all 60,000
    test_images: int | None  # None: all 10,000
    image_size: int
    teacher_arch: str
    teacher_kwargs: dict[str, Any]
    student_arch: str
    student_kwargs: dict[str, Any]
    teacher_epochs: int
    epochs: int  # every student, the from-scratch one included
    batch_size: int
    ssl_method: str  # the teacher's and the from-scratch student's
    ssl_lr: float
    distill_lr: float
    teacher_cache: str  # "none" (live teacher), "center", or "views:K"
    queue_size: int
    temperature: float
    ema: float  # the compress-2q key encoder's momentum
    knn_k: int
    workers: int
    device: str
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS = {
    # CPU, minutes on 2 cores: ImageNet stems at 32 px keep the teacher at 37 MFLOPs; the students
    # see the teacher's exact augmented views through a 4-view teacher cache. With only ~250 steps per
    # student, the compress-2q key encoder follows the student with momentum 0.99 (0.999 would leave it
    # 78% at its random initialisation at the end). One torch thread plus
    # one data-loading process: on a 2-core machine shared with other jobs, two intra-op threads
    # were 2.5x slower than one (each op waits for a core that is busy elsewhere).
    "quick": Setting(
        name="quick", train_images=4000, test_images=2000, image_size=32,
        teacher_arch="resnet18", teacher_kwargs={"small_input": False},
        student_arch="mobilenet_v3_small", student_kwargs={"small_input": False},
        teacher_epochs=10, epochs=8, batch_size=128, ssl_method="simclr", ssl_lr=0.06, distill_lr=0.05,
        teacher_cache="views:4", queue_size=4000, temperature=0.04, ema=0.99, knn_k=20, workers=1, device="auto",
        threads=1,
    ),
    # One GPU: the small-input stems (stride 1), the whole training split, paper-like epochs and a
    # live teacher (the students see exactly the teacher's augmented views).
    "full": Setting(
        name="full", train_images=None, test_images=None, image_size=32,
        teacher_arch="resnet18", teacher_kwargs={"small_input": True},
        student_arch="mobilenet_v2", student_kwargs={"small_input": True},
        teacher_epochs=200, epochs=100, batch_size=512, ssl_method="simclr", ssl_lr=0.5, distill_lr=0.1,
        teacher_cache="none", queue_size=16384, temperature=0.04, ema=0.999, knn_k=20, workers=8, device="auto",
    ),
}


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def split_data(split: str, n: int | None) -> str:
    """DATA for ``n`` images of a Fashion-MNIST split (``fashion-mnist:SPLIT@N``: drawn once with a fixed
    seed), or the whole split when n is None."""
    return f"fashion-mnist:{split}" if n is None else f"fashion-mnist:{split}@{n}"


# --------------------------------------------------------------------------------------------------
# training stages (each reused when its run folder says it finished)
# --------------------------------------------------------------------------------------------------
def _done(run: Path, options: dict) -> dict | None:
    """The record of a finished run made with the same options; None when there is none."""
    marker = run / "benchmark-done.json"
    if not marker.is_file():
        if run.exists():
            raise SystemExit(f"{run} holds an unfinished run: delete it (or pick another --work) and start again")
        return None
    record = json.loads(marker.read_text())
    if record.get("options") != json.loads(json.dumps(options)):
        raise SystemExit(f"{run} was made with other settings: delete it or pick another --work")
    log.info("reusing %s", run)
    return record


def _mark_done(run: Path, options: dict, seconds: float, result) -> dict:
    record = {"seconds": round(seconds, 1), "epochs": result.epochs_done, "steps": result.global_step,
              "last_loss": result.last_loss, "options": options}
    (run / "benchmark-done.json").write_text(json.dumps(record))
    return record


def _train_config(s: Setting, epochs: int, lr: float, *, weight_decay: float, warmup: float):
    from compress_edge.train import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=s.batch_size, lr=lr, weight_decay=weight_decay,
                       warmup_epochs=warmup, workers=s.workers, device=s.device, seed=s.seed, progress=False,
                       log_every=50)


def pretrain(s: Setting, data: str, out: Path, arch: str, kwargs: dict, epochs: int) -> dict:
    from compress_edge.pretrain import PretrainOptions, run_pretrain

    opts = PretrainOptions(data=data, out=str(out), arch=arch, arch_kwargs=dict(kwargs), method=s.ssl_method,
                           image_size=s.image_size, queue_size=min(16384, s.train_images or 60000),
                           train=_train_config(s, epochs, s.ssl_lr, weight_decay=5e-4,
                                               warmup=1 if epochs > 2 else 0))
    if (record := _done(out, opts.to_dict())) is not None:
        return record
    started = time.perf_counter()
    result = run_pretrain(opts)
    return _mark_done(out, opts.to_dict(), time.perf_counter() - started, result)


def teacher_cache(s: Setting, data: str, teacher: Path, out: Path) -> tuple[str | None, float]:
    """Build the teacher cache the setting asks for; (cache folder or None, seconds)."""
    if s.teacher_cache == "none":
        return None, 0.0
    from compress_edge.data import TrainAugment, eval_transform, open_dataset
    from compress_edge.distill import augment_settings, load_teacher
    from compress_edge.teacher_cache import build_cache, fingerprint_parts, tensor_hash
    from compress_edge.train import resolve_device

    mode, _, k = s.teacher_cache.partition(":")
    views = int(k) if mode == "views" else 1
    started = time.perf_counter()
    dataset = open_dataset(data)
    model, spec = load_teacher(str(teacher), None, data, None)
    augment = TrainAugment(spec.image_size, spec.mean, spec.std)
    parts = fingerprint_parts(dataset_fingerprint=dataset.fingerprint(), image_size=spec.image_size,
                              mean=spec.mean, std=spec.std, mode=mode, views=views,
                              augment=augment_settings(augment), seed=s.seed)
    build_cache(model, dataset, out, parts=parts, teacher_sha256=tensor_hash(model), mode=mode, views=views,
                eval_tf=eval_transform(spec.image_size, spec.mean, spec.std), augment=augment, seed=s.seed,
                batch_size=256, workers=s.workers, device=resolve_device(s.device), progress=False,
                extra_meta={"teacher_spec": spec.to_dict(), "data": data})
    return str(out), time.perf_counter() - started


def distill(s: Setting, data: str, teacher: Path, cache: str | None, method: str, out: Path) -> dict:
    from compress_edge.distill import DistillOptions, run_distill

    opts = DistillOptions(data=data, out=str(out), teacher=str(teacher), teacher_cache=cache,
                          student_arch=s.student_arch, student_kwargs=dict(s.student_kwargs), method=method,
                          queue_size=s.queue_size, temperature=s.temperature, ema=s.ema,
                          train=_train_config(s, s.epochs, s.distill_lr, weight_decay=1e-4, warmup=0))
    if (record := _done(out, opts.to_dict())) is not None:
        return record
    started = time.perf_counter()
    result = run_distill(opts)
    return _mark_done(out, opts.to_dict(), time.perf_counter() - started, result)


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
def evaluate(model_dir: Path, gallery: str, test: str, s: Setting, features: Path,
             teacher_test: object = None) -> dict:
    """Linear / NN / kNN / cluster alignment / params / FLOPs of one trained model, and (given the
    teacher's test features) the top-10 neighbour overlap with the teacher on the test images."""
    from compress_edge.data import open_dataset
    from compress_edge.evaluate import (
        cluster_alignment,
        extract_features,
        knn_eval,
        linear_probe,
        neighbor_agreement,
    )
    from compress_edge.models import load_model
    from compress_edge.profile import profile_model

    started = time.perf_counter()
    model, spec = load_model(model_dir)
    kw = dict(spec=spec, batch_size=256, device=s.device, workers=s.workers, cache_dir=features, progress=False)
    xtr, ytr = extract_features(model, open_dataset(gallery), **kw)
    xte, yte = extract_features(model, open_dataset(test), **kw)
    extracted = time.perf_counter() - started
    knn = knn_eval(xtr, ytr, xte, yte, ks=(s.knn_k,), device=s.device)
    linear = linear_probe(xtr, ytr, xte, yte, device=s.device, seed=s.seed)
    cluster = cluster_alignment(xtr, ytr, xte, yte, seed=s.seed)
    prof = profile_model(model, spec.image_size, depth=0)
    agree = (neighbor_agreement(teacher_test, xte, ks=(10,), max_queries=None, device=s.device)
             if teacher_test is not None else None)
    return {
        "overlap10": agree.overlap[10] if agree else None, "spearman": agree.spearman if agree else None,
        "test_features": xte,
        "linear_top1": linear.top1, "nn_top1": knn.nn_top1, f"knn{s.knn_k}_top1": knn.knn[s.knn_k]["top1"],
        "cluster_accuracy": cluster.accuracy, "nmi": cluster.nmi, "ari": cluster.ari,
        "params": prof.params, "flops": prof.flops, "embed_dim": prof.embed_dim,
        "linear": linear.to_dict(), "knn": knn.to_dict(), "cluster": cluster.to_dict(),
        "eval_seconds": round(time.perf_counter() - started, 1), "extract_seconds": round(extracted, 1),
    }


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _opt_pct(v: float | None) -> str:
    return "-" if v is None else _pct(v)


def markdown_table(rows: list[dict], knn_k: int) -> str:
    head = (f"| Model | Method | Params | FLOPs | Linear top-1 | NN top-1 | {knn_k}-NN top-1 | Cluster alignment "
            "| NMI | Top-10 overlap with teacher | Train time |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['params'] / 1e6:.2f} M | {r['flops'] / 1e6:.1f} M "
            f"| {_pct(r['linear_top1'])} | {_pct(r['nn_top1'])} | {_pct(r[f'knn{knn_k}_top1'])} "
            f"| {_pct(r['cluster_accuracy'])} | {r['nmi']:.3f} | {_opt_pct(r['overlap10'])} "
            f"| {r['train_seconds'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def print_table(rows: list[dict], knn_k: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="CompRess Table 1 at small scale (Fashion-MNIST; accuracies in %)")
    for col in ("model", "method", "params", "FLOPs", "linear", "NN", f"{knn_k}-NN", "cluster align.", "NMI",
                "overlap@10", "train"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in rows:
        table.add_row(r["model"], r["method"], f"{r['params'] / 1e6:.2f} M", f"{r['flops'] / 1e6:.1f} M",
                      _pct(r["linear_top1"]), _pct(r["nn_top1"]), _pct(r[f"knn{knn_k}_top1"]),
                      _pct(r["cluster_accuracy"]), f"{r['nmi']:.3f}", _opt_pct(r["overlap10"]),
                      f"{r['train_seconds'] / 60:.1f} min")
    console = Console(width=160)
    console.print(table)
    console.print("FLOPs: fvcore counts one multiply-add as one FLOP. overlap@10: share of each test image's 10 "
                  "nearest test images (teacher's space) that the model also ranks in its 10 nearest.")


def run(s: Setting, work: Path) -> dict:
    import torch

    if s.threads:
        torch.set_num_threads(int(s.threads))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"setting": dataclasses.asdict(s), "machine": machine(), "rows": [], "stages": {}}
    out_json = work / "results.json"

    def save() -> None:
        results["total_seconds"] = round(time.perf_counter() - started, 1)
        out_json.write_text(json.dumps(results, indent=2) + "\n")

    t0 = time.perf_counter()
    train_data = split_data("train", s.train_images)
    test_data = split_data("test", s.test_images)
    results["data"] = {"train": train_data, "test": test_data}
    results["stages"]["data"] = round(time.perf_counter() - t0, 1)
    log.info("data: train %s, test %s (%.0f s)", train_data, test_data, results["stages"]["data"])

    teacher_run = work / "teacher"
    record = pretrain(s, train_data, teacher_run, s.teacher_arch, s.teacher_kwargs, s.teacher_epochs)
    results["stages"]["teacher"] = record
    log.info("teacher trained in %.0f s", record["seconds"])
    save()

    cache, cache_seconds = teacher_cache(s, train_data, teacher_run / "student", work / "teacher-cache")
    results["stages"]["teacher_cache"] = round(cache_seconds, 1)

    runs = [("teacher", f"{s.ssl_method} (teacher)", teacher_run, record)]
    scratch = work / "student-scratch"
    rec = pretrain(s, train_data, scratch, s.student_arch, s.student_kwargs, s.epochs)
    results["stages"]["student-scratch"] = rec
    runs.append(("student", f"{s.ssl_method} from scratch", scratch, rec))
    log.info("student from scratch trained in %.0f s", rec["seconds"])
    save()
    for method in STUDENT_METHODS:
        out = work / f"student-{method}"
        rec = distill(s, train_data, teacher_run / "student", cache, method, out)
        results["stages"][f"student-{method}"] = rec
        runs.append(("student", method, out, rec))
        log.info("%s student trained in %.0f s", method, rec["seconds"])
        save()

    teacher_test = None
    for who, method, run_dir, rec in runs:
        arch = s.teacher_arch if who == "teacher" else s.student_arch
        row = {"model": f"{who}: {arch}", "method": method, "run": str(run_dir),
               "train_seconds": rec["seconds"] + (cache_seconds if method in STUDENT_METHODS else 0.0)}
        row.update(evaluate(run_dir / "student", train_data, test_data, s, work / "features", teacher_test))
        xte = row.pop("test_features")
        teacher_test = xte if teacher_test is None else teacher_test
        results["rows"].append(row)
        log.info("%s / %s: NN %.1f, linear %.1f, CA %.1f", row["model"], method, 100 * row["nn_top1"],
                 100 * row["linear_top1"], 100 * row["cluster_accuracy"])
        save()

    teacher_row = results["rows"][0]
    best = {r["method"]: r for r in results["rows"][1:]}
    results["summary"] = {
        "flops_ratio": teacher_row["flops"] / best["compress-2q"]["flops"],
        "params_ratio": teacher_row["params"] / best["compress-2q"]["params"],
        "nn_gap_compress2q_vs_teacher": teacher_row["nn_top1"] - best["compress-2q"]["nn_top1"],
        "nn_gap_compress1q_vs_teacher": teacher_row["nn_top1"] - best["compress-1q"]["nn_top1"],
    }
    with contextlib.suppress(OSError):
        results["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results["markdown"] = markdown_table(results["rows"], s.knn_k)
    (work / "table.md").write_text(results["markdown"] + "\n")
    save()
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU setting, minutes (the default)")
    mode.add_argument("--full", action="store_true", help="GPU setting: all images, paper-like epochs")
    p.add_argument("--work", type=Path, default=None, help="Folder for data, runs, features and results "
                   "(default: runs/paper-table-<setting>)")
    for name, kind in (("train-images", int), ("test-images", int), ("image-size", int), ("teacher-epochs", int),
                       ("epochs", int), ("batch-size", int), ("workers", int), ("queue-size", int),
                       ("ssl-lr", float), ("distill-lr", float), ("teacher-cache", str), ("device", str),
                       ("ssl-method", str), ("teacher-arch", str), ("student-arch", str), ("seed", int),
                       ("threads", int)):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--student-kwargs", type=json.loads, default=None, help='JSON, e.g. \'{"width_mult": 0.5}\'')
    p.add_argument("--teacher-kwargs", type=json.loads, default=None)
    args = p.parse_args(argv)

    preset = "full" if args.full else "quick"
    s = dataclasses.replace(PRESETS[preset])
    for f in dataclasses.fields(Setting):
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(s, f.name, v)
    for opt in ("train_images", "test_images"):  # 0 on the command line: the whole split
        if getattr(s, opt) == 0:
            setattr(s, opt, None)
    work = args.work or Path("runs") / f"paper-table-{preset}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    results = run(s, work)
    print_table(results["rows"], s.knn_k)
    summary = results["summary"]
    print(f"compress-2q student: {summary['flops_ratio']:.1f}x fewer FLOPs, {summary['params_ratio']:.1f}x fewer "
          f"parameters than the teacher; NN gap to the teacher {100 * summary['nn_gap_compress2q_vs_teacher']:+.1f} "
          f"points (compress-1q {100 * summary['nn_gap_compress1q_vs_teacher']:+.1f})")
    print(f"total {results['total_seconds'] / 60:.1f} min; results in {work / 'results.json'} and {work / 'table.md'}")


if __name__ == "__main__":
    main()
