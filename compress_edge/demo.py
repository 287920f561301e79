"""The main job, end to end, on the embedded default data: ``compress-edge demo``.

Stages (each skipped when its output is already in the output folder; ``--fresh`` starts over):

1. take the shipped self-supervised teacher (or ``--teacher``, or pretrain one with ``--pretrain-teacher``);
2. cache the teacher and distil a student with the default CompRess method;
3. profile both (parameters, FLOPs);
4. evaluate both, and the same student before distillation: kNN (1-NN and weighted), linear,
   cluster alignment, teacher-student agreement;
5. export the student to ONNX and ``int8 cpu`` (and TensorRT where a builder is installed), with
   parity, and time each backend;
6. build a FAISS index of the training images with the exported model, classify the test images
   through it (kNN), and search a few test images;
7. write ``report.md``, ``report.json`` and pictures (loss curve, accuracy and cost side by side,
   latency per backend, a retrieval grid).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress_edge.defaults import DEFAULT_METHOD, PAPER_TEMPERATURE
from compress_edge.errors import CompressEdgeError
from compress_edge.signals import Interrupted, StopRequest
from compress_edge.storage import atomic_write_json

logger = logging.getLogger(__name__)


#: The teacher the demo uses unless told otherwise: made by ``compress-edge pretrain`` (the command,
#: machine and time are in the README), stored as float16 safetensors with its sha256 in model.json.
SHIPPED_TEACHER = Path(__file__).resolve().parent / "assets" / "fashion-mnist-teacher"


def shipped_teacher() -> Path:
    """The folder of the teacher shipped with the package; a clear error when it is missing."""
    if not (SHIPPED_TEACHER / "model.safetensors").is_file():
        raise CompressEdgeError(
            f"the shipped teacher is missing from {SHIPPED_TEACHER} (an incomplete install?); reinstall "
            "compress-edge, or run the demo with --pretrain-teacher (or --teacher MODEL_DIR)"
        )
    return SHIPPED_TEACHER


@dataclass
class DemoSettings:
    """What the demo trains and measures; ``quick()`` is the small variant the tests use.

    teacher: "shipped" (the packaged teacher) or "pretrain" (train one here with the teacher_*
    settings). The student sees the images at ``student_image_size``, the teacher at its own size;
    the teacher cache holds its embedding of each whole image (``cache_views`` 0, distill's default
    teacher view), or of ``cache_views`` recorded augmented views per image, replayed for the student.
    """

    train_data: str = "fashion-mnist:train@20000"
    test_data: str = "fashion-mnist:test@2000"
    teacher: str = "shipped"
    teacher_arch: str = "resnet18"
    teacher_kwargs: dict[str, Any] = field(default_factory=lambda: {"small_input": False})
    teacher_image_size: int = 64
    teacher_method: str = "simclr"
    teacher_epochs: int | None = None
    teacher_batch: int | None = None
    teacher_amp: str = "auto"
    student_arch: str = "mobilenet_v2"
    student_kwargs: dict[str, Any] = field(default_factory=lambda: {"width_mult": 0.5, "small_input": True})
    student_image_size: int = 32
    embed_dim: int = 128
    distill_method: str = DEFAULT_METHOD
    distill_epochs: int | None = 10
    distill_batch: int | None = 256
    #: The demo's runs are short and use a large batch: the learning rate it was measured with (the
    #: linear rule's 0.05 per 256) is given explicitly; ``distill``'s automatic one targets small data.
    distill_lr: float | None = 0.05
    queue_size: int | None = None
    temperature: float = PAPER_TEMPERATURE
    ema: float | None = None
    cache_views: int = 0
    calib_images: int = 256
    search_queries: int = 6
    workers: int = 2
    device: str = "auto"
    data_root: str | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> DemoSettings:
        # 20 epochs of 15 steps: 6 (90 steps) left the student 24 points behind its teacher, and the
        # whole --quick run in 1.5 of its 3 minutes.
        base = cls(train_data="fashion-mnist:train@2000", test_data="fashion-mnist:test@500", teacher_epochs=2,
                   teacher_batch=128, distill_epochs=20, distill_batch=128, distill_lr=0.05, cache_views=0,
                   calib_images=64,
                   search_queries=4)
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Stage:
    name: str
    title: str
    run: Callable[[Demo], dict[str, Any]]


class DemoStopped(CompressEdgeError):
    """The demo stopped on SIGINT or SIGTERM; the message says what is kept and how to continue."""


class Demo:
    """Runs the stages in order into ``out``; each stage's result is saved in ``out/stages/NAME.json``
    and reused when the demo runs again with the same settings."""

    def __init__(self, out: str | Path, settings: DemoSettings, *, teacher: str | None = None,
                 fresh: bool = False, progress: bool = True):
        self.out = Path(out)
        self.settings = settings
        self.teacher_ref = teacher
        self.progress = progress
        if fresh and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_settings()
        self.results: dict[str, dict[str, Any]] = {}

    # -- bookkeeping -------------------------------------------------------------------------------
    def _check_settings(self) -> None:
        path = self.out / "settings.json"
        current = {"settings": self.settings.to_dict(), "teacher": self.teacher_ref}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved != current:
                raise CompressEdgeError(
                    f"{self.out} holds a demo made with other settings; add --fresh to start over there, "
                    "or choose another --out"
                )
        else:
            atomic_write_json(path, current)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def run(self, stages: list[Stage]) -> dict[str, Any]:
        """Run the stages not done before. SIGINT or SIGTERM (also sent to the whole process group, by a
        scheduler or ``docker stop``) stops the demo with :class:`DemoStopped` (one line: the finished
        stages are kept, and running the demo again continues). Outside the stages' own handling a signal
        stops the demo at once. A training stage and the teacher cache take the signals over while they
        run and stop at a safe point, raising ``TrainingStopped``, or, when the signal comes during their
        last step or shard, finish the stage; the demo's handler still sees that signal (``seen``), so
        such a stop ends the demo after the stage."""
        signals = StopRequest(at_once=True, watch=True)
        with self._stopped_by(signals, stages) as where, signals:
            for i, stage in enumerate(stages, 1):
                where[:] = [i, "during"]
                record = self.path("stages", f"{stage.name}.json")
                if record.is_file():
                    self.results[stage.name] = json.loads(record.read_text())
                    logger.info("[%d/%d] %s: done before, skipped", i, len(stages), stage.title)
                    continue
                logger.info("[%d/%d] %s", i, len(stages), stage.title)
                t0 = time.perf_counter()
                result = stage.run(self)
                result["seconds"] = round(time.perf_counter() - t0, 1)
                atomic_write_json(record, result)
                self.results[stage.name] = result
                where[:] = [i, "after"]
                # a stop that the stage's own handler took, when the stage finished anyway (a signal
                # during the teacher cache's last shard): the demo stops here, the stage kept
                if signals.seen() is not None and i < len(stages):
                    raise Interrupted(signals.signal)
        return self.results

    @contextlib.contextmanager
    def _stopped_by(self, signals: StopRequest, stages: list[Stage]) -> Iterator[list]:
        """Turn a stop (the demo's handler, or a training stage or the cache stopping at a safe point)
        into one :class:`DemoStopped` line."""
        from compress_edge.train.engine import TrainingStopped

        where: list = [1, "during"]
        try:
            yield where
        except (Interrupted, TrainingStopped, KeyboardInterrupt) as exc:  # KeyboardInterrupt: a second
            # signal during a training stage, which stops it at once
            signum = exc.signum if isinstance(exc, Interrupted) else signals.signal
            name = signal.Signals(signum).name if signum is not None else "a stop signal"
            i, when = where
            stage = stages[i - 1]
            done = sum(self.path("stages", f"{s.name}.json").is_file() for s in stages)
            resumes = ("; an interrupted training or teacher cache continues from its last checkpoint or shard"
                       if when == "during" else "")
            raise DemoStopped(
                f"demo stopped by {name} {when} stage {i}/{len(stages)} ({stage.title}); run the same command "
                f"again to continue: the {done} finished stage{'s' if done != 1 else ''} in "
                f"{self.path('stages')} {'are' if done != 1 else 'is'} skipped{resumes}"
            ) from None


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
def _train_config(demo: Demo, *, epochs: int | None, batch: int | None, amp: str = "auto",
                  lr: float | None = None):
    from compress_edge.train.config import TrainConfig

    s = demo.settings
    return TrainConfig(epochs=epochs, batch_size=batch, lr=lr, warmup_epochs=None, workers=s.workers,
                       device=s.device, amp=amp, progress=demo.progress, log_every=5)


def stage_teacher(demo: Demo) -> dict[str, Any]:
    from compress_edge.models.resolve import load_model
    from compress_edge.train.pretrain import PretrainOptions, run_pretrain

    s = demo.settings
    if demo.teacher_ref or s.teacher == "shipped":
        folder = Path(demo.teacher_ref) if demo.teacher_ref else shipped_teacher()
        _, spec = load_model(folder)  # checks the weights against the sha256 in model.json
        return {"teacher": str(folder.resolve()), "pretrained_here": False, "spec": spec.to_dict()}
    run_dir = demo.path("teacher")
    opts = PretrainOptions(
        data=s.train_data, out=str(run_dir), arch=s.teacher_arch, arch_kwargs=dict(s.teacher_kwargs),
        method=s.teacher_method, image_size=s.teacher_image_size, data_root=s.data_root, holdout=0.0,
        train=_train_config(demo, epochs=s.teacher_epochs, batch=s.teacher_batch, amp=s.teacher_amp),
    )
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    result = run_pretrain(opts, resume=resume)
    return {"teacher": str(run_dir / "student"), "pretrained_here": True, "epochs": result.epochs_done,
            "last_loss": result.last_loss, "train_seconds": result.seconds}


#: Images per teacher-cache shard in the demo. A stop signal ends the cache once the current shard is
#: written, and a new run resumes from the last whole shard: one shard of the default 65,536 rows held the
#: demo's whole cache (a stop waited minutes for it). The views are drawn per image, so the numbers do not
#: depend on it.
DEMO_CACHE_SHARD_ROWS = 1024


def stage_cache(demo: Demo) -> dict[str, Any]:
    from compress_edge.train.distill import cache_teacher

    s = demo.settings
    cache = cache_teacher(s.train_data, demo.path("teacher-cache"), teacher=demo.results["teacher"]["teacher"],
                          views=s.cache_views, data_root=s.data_root, workers=s.workers, device=s.device,
                          shard_rows=DEMO_CACHE_SHARD_ROWS, progress=demo.progress)
    return {"cache": str(demo.path("teacher-cache")), "images": len(cache), "views": cache.views, "dim": cache.dim}


def longer_distill(demo: Demo) -> str:
    """What the distillation's run-length warning tells a demo user to run (the demo has no --epochs):
    the ``distill`` command that trains the demo's student from the demo's teacher cache, with
    ``{epochs}`` for the longer run's epochs; after a smaller run than the default demo's, the full demo too."""
    import shlex

    s = demo.settings
    words = ["compress-edge", "distill", s.train_data, "--teacher-cache", str(demo.path("teacher-cache")),
             "--arch", s.student_arch]
    for key, value in s.student_kwargs.items():
        words += ["--arch-kwargs", f"{key}={json.dumps(value)}"]
    words += ["--student-image-size", str(s.student_image_size), "--embed-dim", str(s.embed_dim),
              "--method", s.distill_method, "--temperature", f"{s.temperature:g}", "--holdout", "0"]
    for flag, value in (("--queue-size", s.queue_size), ("--ema", s.ema), ("--batch-size", s.distill_batch),
                        ("--lr", s.distill_lr), ("--data-root", s.data_root)):
        if value is not None:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    words += ["--epochs", "EPOCHS", "--out", str(demo.path("student-longer"))]
    command = shlex.join(words).replace("{", "{{").replace("}", "}}").replace("--epochs EPOCHS", "--epochs {epochs}")
    if s.train_data != DemoSettings.train_data:
        command += " (or the full demo, without --quick)"
    return command


def stage_distill(demo: Demo) -> dict[str, Any]:
    from compress_edge.train.distill import DistillOptions, load_options, run_distill

    s = demo.settings
    run_dir = demo.path("student")
    if (run_dir / "checkpoints" / "last.pt").is_file():
        result = run_distill(load_options(run_dir), resume=True, longer=longer_distill(demo))
    else:
        opts = DistillOptions(
            data=s.train_data, out=str(run_dir), teacher=demo.results["teacher"]["teacher"],
            teacher_cache=demo.results["cache"]["cache"], student_arch=s.student_arch,
            student_kwargs=dict(s.student_kwargs), student_image_size=s.student_image_size, embed_dim=s.embed_dim,
            method=s.distill_method, queue_size=s.queue_size, temperature=s.temperature, ema=s.ema, holdout=0.0,
            data_root=s.data_root, train=_train_config(demo, epochs=s.distill_epochs, batch=s.distill_batch,
                                                          lr=s.distill_lr),
        )
        result = run_distill(opts, longer=longer_distill(demo))
    return {"student": str(run_dir / "student"), "epochs": result.epochs_done, "steps": result.global_step,
            "last_loss": result.last_loss, "train_seconds": result.seconds}


def _eval_sets(demo: Demo):
    from compress_edge.data.datasets import open_dataset

    s = demo.settings
    return open_dataset(s.train_data, data_root=s.data_root), open_dataset(s.test_data, data_root=s.data_root)


def stage_profile(demo: Demo) -> dict[str, Any]:
    from compress_edge.eval.profile import compare, profile_model
    from compress_edge.models.resolve import load_model

    t_model, t_spec = load_model(demo.results["teacher"]["teacher"])
    s_model, s_spec = load_model(demo.results["distill"]["student"])
    teacher = profile_model(t_model, t_spec.image_size, name="teacher", spec=t_spec, depth=1)
    student = profile_model(s_model, s_spec.image_size, name="student", spec=s_spec, depth=1)
    return {"teacher": {"arch": t_spec.arch, "params": teacher.params, "flops": teacher.flops,
                        "weight_bytes": teacher.weight_bytes, "embed_dim": t_spec.embed_dim},
            "student": {"arch": s_spec.arch, "params": student.params, "flops": student.flops,
                        "weight_bytes": student.weight_bytes, "embed_dim": s_spec.embed_dim},
            "ratios": compare(teacher, student)}


def stage_evaluate(demo: Demo) -> dict[str, Any]:
    from compress_edge.eval.agreement import neighbor_agreement
    from compress_edge.eval.clustering import cluster_alignment
    from compress_edge.eval.features import extract_features
    from compress_edge.eval.knn import knn_eval
    from compress_edge.eval.linear import linear_probe
    from compress_edge.eval.quality import embedding_spread, random_weights_model, raw_pixel_features
    from compress_edge.models.resolve import load_model

    s = demo.settings
    train, test = _eval_sets(demo)
    t_model, t_spec = load_model(demo.results["teacher"]["teacher"])
    s_model, s_spec = load_model(demo.results["distill"]["student"])
    twin = random_weights_model(s_spec, train)
    models = {"teacher": (t_model, t_spec), "student": (s_model, s_spec),
              "student before distillation": (twin, s_spec.replace(weights_sha256="random-init-bn-recalibrated"))}
    cache = demo.path("features")
    feats: dict[str, tuple] = {}
    for name, (model, spec) in models.items():
        kw = dict(spec=spec, device=s.device, workers=s.workers, cache_dir=cache, progress=demo.progress)
        feats[name] = (extract_features(model, train, **kw), extract_features(model, test, **kw))
    size = s_spec.image_size
    feats["raw pixels"] = ((raw_pixel_features(train, size), train.labels), (raw_pixel_features(test, size), test.labels))
    rows: dict[str, dict[str, Any]] = {}
    for name, (tr, te) in feats.items():
        knn = knn_eval(tr[0], tr[1], te[0], te[1], device=s.device)
        lin = linear_probe(tr[0], tr[1], te[0], te[1], device=s.device)
        clu = cluster_alignment(tr[0], tr[1], te[0], te[1])
        rows[name] = {"nn_top1": knn.nn_top1, "knn20_top1": knn.knn[20]["top1"], "knn200_top1": knn.knn[200]["top1"],
                      "linear_top1": lin.top1, "linear_top5": lin.top5, "cluster_accuracy": clu.accuracy,
                      "nmi": clu.nmi, "ari": clu.ari, "dim": int(te[0].shape[1]),
                      "bytes_per_image": 4 * int(te[0].shape[1]), "spread": embedding_spread(te[0]).to_dict()}
    agree = neighbor_agreement(feats["teacher"][1][0], feats["student"][1][0], device=s.device)
    before = neighbor_agreement(feats["teacher"][1][0], feats["student before distillation"][1][0], device=s.device)
    return {"rows": rows, "agreement": agree.to_dict(), "agreement_before": before.to_dict(),
            "train": s.train_data, "test": s.test_data}


def stage_export(demo: Demo) -> dict[str, Any]:
    import numpy as np

    from compress_edge.data.images import preprocess_batch
    from compress_edge.deps import available
    from compress_edge.export.bench import benchmark
    from compress_edge.export.pipeline import ExportOptions, export_model
    from compress_edge.export.runtimes import open_embedder

    s = demo.settings
    out = demo.path("export")
    trt = available("tensorrt") or available("tensorrt_rtx")
    opts = ExportOptions(model=demo.results["distill"]["student"], out=str(out), int8=["cpu"],
                         calib_data=s.train_data, calib_images=s.calib_images, parity_data=s.test_data,
                         trt=trt, strict=False, progress=demo.progress)
    report = export_model(opts)
    latency = []
    # Timed on 32 of the demo's test images (an int8 model may answer random tensors with zeros, which
    # would make its latency and parity describe nothing real), preprocessed once per preprocessing.
    test = _eval_sets(demo)[1]
    picks = np.unique(np.linspace(0, len(test) - 1, num=min(32, len(test))).round().astype(int))
    loaded: dict[tuple, Any] = {}
    for label, ref in (("PyTorch", demo.results["distill"]["student"]), ("onnxruntime fp32", out / "model.onnx"),
                       ("onnxruntime int8", out / "model.int8-cpu.onnx")):
        embedder = open_embedder(str(ref), threads=None)
        try:
            spec = embedder.spec
            key = (spec.channels, spec.image_size, tuple(spec.mean), tuple(spec.std))
            if key not in loaded:
                loaded[key] = preprocess_batch([test.get_image(int(i)) for i in picks], spec.image_size, spec.mean,
                                               spec.std)
            for row in benchmark(embedder, (1, 32), warmup=3, iters=20, label=label, images=loaded[key]):
                latency.append({"backend": label, "batch": row.batch, "p50_ms": row.p50_ms, "p95_ms": row.p95_ms})
        finally:
            embedder.close()
    parity = {k: {"min_cosine": v["min_cosine"], "top10_overlap": v.get("topk_overlap"), "passed": v["passed"]}
              for k, v in report["parity"].items()}
    return {"folder": str(out), "files": report["files"], "parity": parity, "latency": latency,
            "latency_inputs": {"kind": "real", "data": s.test_data, "images": len(picks)},
            "engine": report["steps"].get("engine")}


def stage_retrieval(demo: Demo) -> dict[str, Any]:
    from compress_edge.retrieval.grid import draw_grid
    from compress_edge.retrieval.index import build_from_images
    from compress_edge.retrieval.search import Searcher

    s = demo.settings
    model = str(demo.path("export", "model.onnx"))
    index_dir = demo.path("index")
    built = build_from_images(model, [s.train_data], index_dir, workers=s.workers, data_root=s.data_root,
                              progress=demo.progress)
    train, test = _eval_sets(demo)
    with Searcher(index_dir, model=model) as searcher:
        x = searcher.embed([test.get_image(i) for i in range(len(test))])
        result = searcher.classify_embeddings(x)
        accuracy = float((result.predictions == test.labels).mean())
        queries = list(range(0, len(test), max(1, len(test) // s.search_queries)))[: s.search_queries]
        hits = searcher.search_embeddings(x[queries], k=6)
    names = test.classes
    draw_grid([(test.get_image(i), names[test.labels[i]]) for i in queries], hits,
              demo.path("report", "retrieval.png"), query_labels=[names[test.labels[i]] for i in queries])
    vectors = getattr(built, "ntotal", None)
    faiss_files = sorted(index_dir.rglob("*.faiss"), key=lambda p: p.stat().st_mtime)
    index_bytes = faiss_files[-1].stat().st_size if faiss_files else None
    return {"index": str(index_dir), "key": getattr(built, "key", None), "vectors": vectors,
            "index_bytes": index_bytes, "index_bytes_per_image": round(index_bytes / vectors) if index_bytes and vectors
            else None, "knn_accuracy_through_index": accuracy, "queries": len(test)}


def stage_report(demo: Demo) -> dict[str, Any]:
    from compress_edge.report import write_report

    return write_report(demo)


def default_stages() -> list[Stage]:
    return [
        Stage("teacher", "the self-supervised teacher (shipped, given, or pretrained here)", stage_teacher),
        Stage("cache", "cache the teacher's embeddings", stage_cache),
        Stage("distill", "distil the student (CompRess)", stage_distill),
        Stage("profile", "profile teacher and student (fvcore)", stage_profile),
        Stage("evaluate", "evaluate teacher, student and the student before distillation", stage_evaluate),
        Stage("export", "export the student (ONNX, int8) with parity, and time each backend", stage_export),
        Stage("retrieval", "index the training images, classify and search the test images", stage_retrieval),
        Stage("report", "write the report", stage_report),
    ]


def run_demo(out: str | Path, settings: DemoSettings, *, teacher: str | None = None, fresh: bool = False,
             progress: bool = True) -> dict[str, Any]:
    demo = Demo(out, settings, teacher=teacher, fresh=fresh, progress=progress)
    return demo.run(default_stages())
