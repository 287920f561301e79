"""``compress-edge eval``: kNN, linear probe, cluster alignment and teacher-student agreement."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from compress_edge.cli import app
from compress_edge.cli.common import DEVICE_METAVAR
from compress_edge.errors import CompressEdgeError

log = logging.getLogger("compress_edge.cli.eval")

eval_app = typer.Typer(
    help=(
        "Measure frozen embeddings: kNN and 1-NN accuracy, a linear probe, cluster alignment, and how "
        "well a student keeps its teacher's neighbours. Features are cached, so a second evaluation of "
        "the same model on the same data is instant.\n\n"
        "Example: compress-edge eval knn runs/distill --train fashion-mnist:train --test fashion-mnist:test"
    ),
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")

ModelArg = Annotated[
    str,
    typer.Argument(help="A compress-edge model or run folder, an exported .onnx / .engine file, or an "
                        "architecture name (random weights: a baseline)."),
]
TrainOpt = Annotated[str, typer.Option("--train", help="Gallery / training images: a class folder or "
                                                       "fashion-mnist:train.")]
TestOpt = Annotated[str, typer.Option("--test", help="Query / test images: a class folder or fashion-mnist:test.")]
DataRootOpt = Annotated[str | None, typer.Option("--data-root", help="Where to look for Fashion-MNIST first.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Data-loader worker processes.")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar=DEVICE_METAVAR, help="auto (CUDA when present), cpu, "
                                                                             "cuda or cuda:N.")]
WeightsOpt = Annotated[str | None, typer.Option("--weights", help="A third-party checkpoint for an architecture-name "
                                                                   "MODEL (torchvision, MoCo, SimCLR, SwAV, DINO, "
                                                                   "Lightning): detected automatically.")]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", min=8, help="Input side in pixels (default: "
                                                  "the model's; 224 for an architecture name).")]
CacheDirOpt = Annotated[Path | None, typer.Option("--cache-dir", help="Features cache (default: "
                                                  "$COMPRESS_EDGE_CACHE/features or ~/.cache/compress-edge/features).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the features cache.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON object instead of a table.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------
def _runtimes():
    """compress_edge.export.runtimes, or a clear error when it is not there."""
    try:
        from compress_edge.export import runtimes
    except ImportError as exc:
        raise CompressEdgeError(
            f"exported models (.onnx, .engine) are opened through compress_edge.export, which cannot be "
            f"imported here ({exc}); evaluate the compress-edge model folder instead"
        ) from None
    return runtimes


def is_exported(ref: str) -> bool:
    """Whether ``ref`` names an exported model file (.onnx, a TensorRT engine or an OpenVINO IR: runtimes'
    suffixes)."""
    runtimes = _runtimes()
    return Path(ref).suffix.lower() in runtimes.ONNX_SUFFIXES + runtimes.ENGINE_SUFFIXES + runtimes.IR_SUFFIXES


def exported_spec(ref: str):
    """The ModelSpec of an exported file, without running it (ONNX or IR metadata, an engine's sidecar)."""
    runtimes = _runtimes()
    if Path(ref).suffix.lower() in runtimes.ONNX_SUFFIXES + runtimes.IR_SUFFIXES:
        with runtimes.open_embedder(ref, device="cpu") as emb:
            return emb.spec
    from compress_edge.models.spec import ModelSpec

    return ModelSpec.from_dict(runtimes.read_sidecar(ref)["spec"])


def open_model(ref: str, *, device: str, image_size: int | None, weights: str | None = None,
               weights_option: str = "--weights") -> tuple[Any, Any, str]:
    """(model or embedder, spec, backend) for a MODEL argument (an architecture name with ``weights``: its
    checkpoint, given with ``weights_option``)."""
    if is_exported(ref):
        if weights is not None:
            raise CompressEdgeError(f"{weights_option} goes with an architecture name, not with {ref}")
        runtimes = _runtimes()
        emb = runtimes.open_embedder(ref, device=device, image_size=image_size)
        return emb, emb.spec, f"{emb.name} {emb.precision}"
    from compress_edge.devices import resolve_device
    from compress_edge.errors import ModelError
    from compress_edge.models.resolve import resolve_model

    try:
        model, spec = resolve_model(ref, weights=weights, image_size=image_size, device=resolve_device(device))
    except ModelError as exc:  # the library names --weights: say the option of this command
        raise ModelError(str(exc).replace("--weights", weights_option)) from None
    if spec.source.get("kind") == "random-init":
        log.warning("%s is an architecture name: its weights are random (a baseline, not a trained model)", ref)
    return model, spec, "torch fp32"


def features(model: Any, spec: Any, data: str, *, data_root: str | None, batch_size: int, workers: int,
             device: str, cache_dir: Path | None, no_cache: bool, progress: bool):
    from compress_edge.data.datasets import open_dataset
    from compress_edge.eval.protocols import extract_features

    dataset = open_dataset(data, data_root=data_root, progress=progress)  # --no-progress: no "checking images"
    x, y = extract_features(model, dataset, spec=spec, batch_size=batch_size, device=device, workers=workers,
                            cache_dir=cache_dir, use_cache=not no_cache, progress=progress)
    return x, y, dataset


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _print(title: str, rows: list[tuple[str, str]], notes: list[str] = ()) -> None:
    from rich.table import Table

    from compress_edge.cli.common import console

    # The title on its own line: as a table title it would wrap to the narrow table's width.
    console.print(title, markup=False, highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    for note in notes:
        console.print(note, markup=False, highlight=False, soft_wrap=True)


def _emit(payload: dict[str, Any]) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def _describe(ref: str, spec: Any, backend: str) -> dict[str, Any]:
    return {"model": ref, "arch": spec.arch, "backend": backend, "image_size": spec.image_size,
            "embed_dim": spec.embed_dim}


# --------------------------------------------------------------------------------------------------
# knn
# --------------------------------------------------------------------------------------------------
@eval_app.command("knn")
def knn_cmd(
    model: ModelArg,
    test: TestOpt,
    train: Annotated[str | None, typer.Option("--train", help="Gallery images: a class folder or "
                                                              "fashion-mnist:train (not with --index).")] = None,
    index: Annotated[Path | None, typer.Option("--index", help="Search this index folder (built by 'compress-edge "
                                                               "index build' with the same model) instead of "
                                                               "embedding --train.")] = None,
    k: Annotated[list[int] | None, typer.Option("-k", min=1, help="Neighbours of the weighted vote "
                                                "(repeatable; default 20 and 200).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-T", min=1e-6, help="Vote weight exp(sim / T).")] = 0.07,
    weights: WeightsOpt = None,
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 256,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    image_size: ImageSizeOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    baselines: Annotated[bool, typer.Option("--baselines", help="Also measure the two baselines a model has to "
                                            "beat: cosine kNN on raw pixels, and the same network with random "
                                            "weights (batch-norm statistics re-estimated on --train).")] = False,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """1-NN accuracy (the CompRess paper's NN column) and weighted kNN accuracy (DINO's protocol: weights
    exp(sim / T), T = 0.07, k = 20 and 200), by exact search over the gallery; and the spread of the
    query embeddings (mean pairwise cosine, effective rank), with a warning when they have collapsed.

    Example: compress-edge eval knn runs/distill --train fashion-mnist:train --test fashion-mnist:test --baselines
    """
    from compress_edge.eval.protocols import knn_eval
    from compress_edge.eval.quality import embedding_spread, spread_warnings

    ks = sorted(set(k or [20, 200]))
    if (train is None) == (index is None):
        raise CompressEdgeError("pass the gallery: either --train DATA or --index INDEX_DIR (one of them)")
    if baselines and index is not None:
        raise CompressEdgeError("--baselines needs the gallery images: pass --train DATA instead of --index")
    net, spec, backend = open_model(model, device=device, image_size=image_size, weights=weights)
    opts = dict(data_root=data_root, batch_size=batch_size, workers=workers, device=device, cache_dir=cache_dir,
                no_cache=no_cache, progress=progress and not as_json)
    xte, yte, test_ds = features(net, spec, test, **opts)
    if index is not None:
        result = _knn_with_index(index, spec, xte, yte, test_ds.classes, ks, temperature)
        gallery = str(index)
    else:
        xtr, ytr, _ = features(net, spec, train, **opts)
        result = knn_eval(xtr, ytr, xte, yte, ks=ks, temperature=temperature, device=device)
        gallery = train
    spread = embedding_spread(xte)
    for warning in spread_warnings(spread, str(model)):
        log.warning("%s", warning)
    payload = {**_describe(model, spec, backend), "gallery": gallery, "test": test, **result.to_dict(),
               "spread": spread.to_dict()}
    compared = None
    if baselines:
        compared = _baselines(xtr, xte, train, test, spec, ks=ks, temperature=temperature, opts=opts)
        payload["baselines"] = compared
    if as_json:
        _emit(payload)
        return
    rows = [("1-NN top-1 %", _pct(result.nn_top1))]
    for kk in ks:
        rows.append((f"{kk}-NN top-1 %", _pct(result.knn[kk]["top1"])))
        if result.num_classes > 5:
            rows.append((f"{kk}-NN top-5 %", _pct(result.knn[kk]["top5"])))
    rows += [("mean pairwise cosine", f"{spread.mean_cosine:.3f}"),
             ("effective rank", f"{spread.effective_rank:.1f} of {spread.dim}"),
             ("queries", str(result.queries)), ("gallery", str(result.gallery))]
    for name, row in (compared or {}).items():
        rows.append((f"{name}: 1-NN / {ks[0]}-NN %", f"{_pct(row['nn_top1'])} / {_pct(row['knn_top1'])}"))
    _print(f"kNN of {model} ({spec.arch}, {backend}), gallery {gallery}, queries {test}", rows,
           [f"weights exp(sim / {temperature:g}); exact search ({result.seconds:.1f} s after extraction)"
            if index is None else f"weights exp(sim / {temperature:g}); neighbours from the index {index}"])


def _baselines(xtr, xte, train: str, test: str, spec, *, ks: list[int], temperature: float, opts: dict) -> dict:
    """kNN of raw pixels and of the same network with random weights on the same gallery and queries."""
    from compress_edge.data.datasets import open_dataset
    from compress_edge.eval.protocols import extract_features, knn_eval
    from compress_edge.eval.quality import random_weights_model, raw_pixel_features

    gallery = open_dataset(train, data_root=opts["data_root"], progress=opts["progress"])
    queries = open_dataset(test, data_root=opts["data_root"], progress=opts["progress"])
    twin = random_weights_model(spec, gallery)
    kw = dict(spec=spec, batch_size=opts["batch_size"], device=opts["device"], workers=opts["workers"],
              use_cache=False, progress=opts["progress"])
    pairs = {"raw pixels": (raw_pixel_features(gallery, spec.image_size), raw_pixel_features(queries, spec.image_size)),
             "random weights": (extract_features(twin, gallery, **kw)[0], extract_features(twin, queries, **kw)[0])}
    out = {}
    for name, (g, q) in pairs.items():
        r = knn_eval(g, gallery.labels, q, queries.labels, ks=ks, temperature=temperature, device=opts["device"])
        out[name] = {"nn_top1": r.nn_top1, "knn_top1": r.knn[ks[0]]["top1"], "k": ks[0]}
    return out


def _knn_with_index(index_dir: Path, spec, xte, yte, test_classes: list[str], ks: list[int], temperature: float):
    try:
        from compress_edge.retrieval.index import open_index
        from compress_edge.retrieval.knn import knn_classify
    except ImportError as exc:
        raise CompressEdgeError(f"--index needs compress_edge.retrieval, which is not available yet ({exc}); "
                                "pass --train DATA to search the gallery exactly") from None
    import numpy as np

    from compress_edge.eval.protocols import knn_from_neighbors

    idx = open_index(index_dir)
    idx.spec.check_compatible(spec, what=f"the index {index_dir}")
    if idx.labels is None:
        raise CompressEdgeError(f"the index {index_dir} holds no labels; build it from a class folder or "
                                "fashion-mnist to evaluate kNN with it")
    # The index numbers its classes by name: bring the test labels into its numbering.
    names = list(idx.classes)
    missing = [c for c in test_classes if c not in names]
    if missing:
        raise CompressEdgeError(f"the index {index_dir} has no class {missing[0]!r} of the test data; its classes "
                                f"are: {', '.join(names[:10])}")
    remap = np.array([names.index(c) for c in test_classes], dtype=np.int64)
    labels = remap[yte]
    found = knn_classify(idx, xte, k=max([1, *ks]), temperature=temperature)
    return knn_from_neighbors(found.similarities, found.neighbour_labels, labels, ks=ks, temperature=temperature,
                              num_classes=max(len(names), int(labels.max()) + 1), gallery_size=idx.ntotal)


# --------------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------------
@eval_app.command("linear")
def linear_cmd(
    model: ModelArg,
    train: TrainOpt,
    test: TestOpt,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", min=0.0, help="L2 penalty (default: "
                                                       "chosen on a held-out 10% of --train).")] = None,
    max_iter: Annotated[int, typer.Option("--max-iter", min=1, help="L-BFGS iterations per fit.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the held-out split.")] = 0,
    weights: WeightsOpt = None,
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 256,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    image_size: ImageSizeOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Top-1 / top-5 of a linear classifier (logistic regression, full-batch L-BFGS) trained on the frozen
    --train features and tested on the --test features.

    Example: compress-edge eval linear runs/distill --train fashion-mnist:train --test fashion-mnist:test
    """
    from compress_edge.eval.protocols import linear_probe

    net, spec, backend = open_model(model, device=device, image_size=image_size, weights=weights)
    opts = dict(data_root=data_root, batch_size=batch_size, workers=workers, device=device, cache_dir=cache_dir,
                no_cache=no_cache, progress=progress and not as_json)
    xtr, ytr, _ = features(net, spec, train, **opts)
    xte, yte, _ = features(net, spec, test, **opts)
    result = linear_probe(xtr, ytr, xte, yte, weight_decay=weight_decay, max_iter=max_iter, device=device, seed=seed)
    if as_json:
        _emit({**_describe(model, spec, backend), "train": train, "test": test, **result.to_dict()})
        return
    chosen = "given" if weight_decay is not None else "chosen on held-out train images"
    _print(f"linear probe of {model} ({spec.arch}, {backend}), train {train}, test {test}", [
        ("top-1 %", _pct(result.top1)), ("top-5 %", _pct(result.top5)), ("train top-1 %", _pct(result.train_top1)),
        ("weight decay", f"{result.weight_decay:g} ({chosen})"), ("L-BFGS iterations", str(result.iterations)),
    ])


# --------------------------------------------------------------------------------------------------
# cluster
# --------------------------------------------------------------------------------------------------
@eval_app.command("cluster")
def cluster_cmd(
    model: ModelArg,
    train: TrainOpt,
    test: Annotated[str | None, typer.Option("--test", help="Images scored with the train clusters' labels "
                                                            "(default: --train itself).")] = None,
    clusters: Annotated[int | None, typer.Option("--clusters", min=1, help="k of k-means (default: the number "
                                                 "of classes).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="k-means seed.")] = 0,
    niter: Annotated[int, typer.Option("--niter", min=1, help="k-means iterations.")] = 50,
    nredo: Annotated[int, typer.Option("--nredo", min=1, help="k-means runs from different starts; the best "
                                       "(lowest objective) is kept.")] = 5,
    weights: WeightsOpt = None,
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 256,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    image_size: ImageSizeOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Cluster alignment (the CompRess paper): spherical k-means of the --train features (faiss, fixed
    seed), clusters matched one-to-one to classes by the Hungarian algorithm on the train labels, and the
    accuracy of that labelling on --test; also NMI and ARI.

    Example: compress-edge eval cluster runs/distill --train fashion-mnist:train --test fashion-mnist:test
    """
    from compress_edge.eval.protocols import cluster_alignment

    net, spec, backend = open_model(model, device=device, image_size=image_size, weights=weights)
    opts = dict(data_root=data_root, batch_size=batch_size, workers=workers, device=device, cache_dir=cache_dir,
                no_cache=no_cache, progress=progress and not as_json)
    xtr, ytr, _ = features(net, spec, train, **opts)
    xte, yte = (xtr, ytr) if test is None else features(net, spec, test, **opts)[:2]
    result = cluster_alignment(xtr, ytr, xte, yte, num_clusters=clusters, seed=seed, niter=niter,
                               nredo=nredo)
    if as_json:
        _emit({**_describe(model, spec, backend), "train": train, "test": test or train, **result.to_dict()})
        return
    _print(f"cluster alignment of {model} ({spec.arch}, {backend}), k-means on {train}, scored on {test or train}", [
        ("accuracy %", _pct(result.accuracy)), ("NMI", f"{result.nmi:.4f}"), ("ARI", f"{result.ari:.4f}"),
        ("train accuracy %", _pct(result.train_accuracy)),
        ("clusters / classes", f"{result.num_clusters} / {result.num_classes}"), ("seed", str(result.seed)),
    ])


# --------------------------------------------------------------------------------------------------
# agreement
# --------------------------------------------------------------------------------------------------
@eval_app.command("agreement")
def agreement_cmd(
    teacher: Annotated[str, typer.Argument(help="The teacher: a model or run folder, an exported file, or an "
                                                "architecture name.")],
    student: Annotated[str, typer.Argument(help="The student, in any of the same forms.")],
    data: Annotated[str, typer.Argument(help="Images both embed: a class folder, an image folder or "
                                             "fashion-mnist:train|test.")],
    k: Annotated[list[int] | None, typer.Option("-k", min=1, help="Neighbourhood sizes of the overlap "
                                                "(repeatable; default 10 and 100).")] = None,
    queries: Annotated[int, typer.Option("--queries", min=1, help="Images used as queries (drawn with --seed; "
                                         "each is compared with all the others).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the query sample.")] = 0,
    teacher_weights: Annotated[str | None, typer.Option("--teacher-weights", help="A third-party checkpoint for an "
                                                        "architecture-name teacher.")] = None,
    student_weights: Annotated[str | None, typer.Option("--student-weights", help="A third-party checkpoint for an "
                                                        "architecture-name student.")] = None,
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 256,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """How well the student keeps the teacher's neighbours on the same images: the share of each query's
    k nearest neighbours (teacher's space) that are also among its k nearest in the student's space, and the
    Spearman rank correlation of the two similarity lists. Labels are not needed.

    Example: compress-edge eval agreement runs/teacher runs/distill fashion-mnist:test
    """
    from compress_edge.eval.protocols import neighbor_agreement

    opts = dict(data_root=data_root, batch_size=batch_size, workers=workers, device=device, cache_dir=cache_dir,
                no_cache=no_cache, progress=progress and not as_json)
    t_net, t_spec, t_backend = open_model(teacher, device=device, image_size=None, weights=teacher_weights,
                                          weights_option="--teacher-weights")
    xt, _, _ = features(t_net, t_spec, data, **opts)
    s_net, s_spec, s_backend = open_model(student, device=device, image_size=None, weights=student_weights,
                                          weights_option="--student-weights")
    xs, _, _ = features(s_net, s_spec, data, **opts)
    result = neighbor_agreement(xt, xs, ks=sorted(set(k or [10, 100])), max_queries=queries, seed=seed, device=device)
    if as_json:
        _emit({"teacher": _describe(teacher, t_spec, t_backend), "student": _describe(student, s_spec, s_backend),
               "data": data, **result.to_dict()})
        return
    rows = [(f"top-{kk} overlap %", _pct(v)) for kk, v in result.overlap.items()]
    rows += [("Spearman rho (mean)", f"{result.spearman:.4f}"), ("Spearman rho (std)", f"{result.spearman_std:.4f}"),
             ("queries / images", f"{result.queries} / {result.images}")]
    _print(f"agreement of {student} ({s_spec.arch}) with {teacher} ({t_spec.arch}) on {data}", rows)
