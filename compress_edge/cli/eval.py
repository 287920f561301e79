"""``compress-edge eval``: kNN, linear probe, cluster alignment and teacher-student agreement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from compress_edge.cli import command_group
from compress_edge.cli.common import DataRootOpt, DeviceOpt, ProgressOpt, WorkersOpt, with_options
from compress_edge.errors import CompressEdgeError
from compress_edge.eval.measure import FeatureOptions  # a dataclass: no torch, no numpy

eval_app = command_group(
    "eval",
    "Measure frozen embeddings: kNN and 1-NN accuracy, a linear probe, cluster alignment, and how "
    "well a student keeps its teacher's neighbours. Features are cached, so a second evaluation "
    "of the same model on the same data is instant.",
    "compress-edge eval knn runs/distill --train fashion-mnist:train --test fashion-mnist:test",
)

ModelArg = Annotated[
    str,
    typer.Argument(help="A compress-edge model or run folder, an exported .onnx / .engine file, or an "
                        "architecture name (random weights: a baseline)."),
]
TrainOpt = Annotated[str, typer.Option("--train", help="Gallery / training images: a class folder or "
                                                       "fashion-mnist:train.")]
TestOpt = Annotated[str, typer.Option("--test", help="Query / test images: a class folder or fashion-mnist:test.")]
#: knn's gallery: images to embed, or an index built from them.
GalleryOpt = Annotated[str | None, typer.Option("--train", help="Gallery images: a class folder or "
                                                                "fashion-mnist:train (not with --index).")]
IndexOpt = Annotated[Path | None, typer.Option("--index", help="Search this index folder (built by 'compress-edge "
                                                               "index build' with the same model) instead of "
                                                               "embedding --train.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
WeightsOpt = Annotated[str | None, typer.Option("--weights", help="A third-party checkpoint for an architecture-name "
                                                                   "MODEL (torchvision, MoCo, SimCLR, SwAV, DINO, "
                                                                   "Lightning): detected automatically.")]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", min=8, help="Input side in pixels (default: "
                                                  "the model's; 224 for an architecture name).")]
CacheDirOpt = Annotated[Path | None, typer.Option("--cache-dir", help="Features cache (default: "
                                                  "$COMPRESS_EDGE_CACHE/features or ~/.cache/compress-edge/features).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the features cache.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON object instead of a table.")]

#: The options of reading and embedding DATA, the same in every eval command (name, type, default), in
#: the order --help lists them after each command's own.
_FEATURE_PARAMS: tuple[tuple[str, Any, Any], ...] = (
    ("data_root", DataRootOpt, None),
    ("batch_size", BatchOpt, 256),
    ("workers", WorkersOpt, 2),
    ("device", DeviceOpt, "auto"),
    ("cache_dir", CacheDirOpt, None),
    ("no_cache", NoCacheOpt, False),
    ("as_json", JsonOpt, False),
    ("progress", ProgressOpt, True),
)


def _pack_features(values: dict[str, Any]) -> dict[str, Any]:
    as_json = values.pop("as_json")
    return {"opts": FeatureOptions(**values | {"progress": values["progress"] and not as_json}), "as_json": as_json}


#: ``@feature_options``: an eval command gets the options every eval command shares (--data-root ...
#: --progress) as ``opts`` (a :class:`~compress_edge.eval.measure.FeatureOptions`, no bar with --json)
#: and ``as_json``.
feature_options = with_options(_FEATURE_PARAMS, _pack_features)


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# knn
# --------------------------------------------------------------------------------------------------
@eval_app.command("knn")
@feature_options
def knn_cmd(
    model: ModelArg,
    test: TestOpt,
    train: GalleryOpt = None,
    index: IndexOpt = None,
    k: Annotated[list[int] | None, typer.Option("-k", min=1, help="Neighbours of the weighted vote "
                                                "(repeatable; default 20 and 200).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-T", min=1e-6, help="Vote weight exp(sim / T).")] = 0.07,
    weights: WeightsOpt = None,
    image_size: ImageSizeOpt = None,
    baselines: Annotated[bool, typer.Option("--baselines", help="Also measure the two baselines a model has to "
                                            "beat: cosine kNN on raw pixels, and the same network with random "
                                            "weights (batch-norm statistics re-estimated on --train).")] = False,
    *,
    opts: FeatureOptions,
    as_json: bool,
) -> None:
    """1-NN accuracy (the CompRess paper's NN column) and weighted kNN accuracy (DINO's protocol: weights
    exp(sim / T), T = 0.07, k = 20 and 200), by exact search over the gallery; and the spread of the
    query embeddings (mean pairwise cosine, effective rank), with a warning when they have collapsed.

    Example: compress-edge eval knn runs/distill --train fashion-mnist:train --test fashion-mnist:test --baselines
    """
    from compress_edge.eval import measure

    ks = sorted(set(k or [20, 200]))
    if (train is None) == (index is None):
        raise CompressEdgeError("pass the gallery: either --train DATA or --index INDEX_DIR (one of them)")
    if baselines and index is not None:
        raise CompressEdgeError("--baselines needs the gallery images: pass --train DATA instead of --index")
    net, spec, backend = measure.open_model(model, device=opts.device, image_size=image_size, weights=weights)
    run = measure.knn(net, spec, name=str(model), test=test, train=train, index=index, ks=ks,
                      temperature=temperature, baselines=baselines, opts=opts)
    result, spread, gallery, compared = run.result, run.spread, run.gallery, run.baselines
    payload = {**measure.describe(model, spec, backend), "gallery": gallery, "test": test, **result.to_dict(),
               "spread": spread.to_dict(), "test_in_gallery": run.test_in_gallery}
    if compared is not None:
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


# --------------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------------
@eval_app.command("linear")
@feature_options
def linear_cmd(
    model: ModelArg,
    train: TrainOpt,
    test: TestOpt,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", min=0.0, help="L2 penalty (default: "
                                                       "chosen on a held-out 10% of --train).")] = None,
    max_iter: Annotated[int, typer.Option("--max-iter", min=1, help="L-BFGS iterations per fit.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the held-out split.")] = 0,
    weights: WeightsOpt = None,
    image_size: ImageSizeOpt = None,
    *,
    opts: FeatureOptions,
    as_json: bool,
) -> None:
    """Top-1 / top-5 of a linear classifier (logistic regression, full-batch L-BFGS) trained on the frozen
    --train features and tested on the --test features.

    Example: compress-edge eval linear runs/distill --train fashion-mnist:train --test fashion-mnist:test
    """
    from compress_edge.eval import measure

    net, spec, backend = measure.open_model(model, device=opts.device, image_size=image_size, weights=weights)
    result = measure.linear(net, spec, train=train, test=test, weight_decay=weight_decay, max_iter=max_iter,
                            seed=seed, opts=opts)
    if as_json:
        _emit({**measure.describe(model, spec, backend), "train": train, "test": test, **result.to_dict()})
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
@feature_options
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
    image_size: ImageSizeOpt = None,
    *,
    opts: FeatureOptions,
    as_json: bool,
) -> None:
    """Cluster alignment (the CompRess paper): spherical k-means of the --train features (faiss, fixed
    seed), clusters matched one-to-one to classes by the Hungarian algorithm on the train labels, and the
    accuracy of that labelling on --test; also NMI and ARI.

    Example: compress-edge eval cluster runs/distill --train fashion-mnist:train --test fashion-mnist:test
    """
    from compress_edge.eval import measure

    net, spec, backend = measure.open_model(model, device=opts.device, image_size=image_size, weights=weights)
    result = measure.cluster(net, spec, train=train, test=test, clusters=clusters, seed=seed, niter=niter,
                             nredo=nredo, opts=opts)
    if as_json:
        _emit({**measure.describe(model, spec, backend), "train": train, "test": test or train, **result.to_dict()})
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
@feature_options
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
    *,
    opts: FeatureOptions,
    as_json: bool,
) -> None:
    """How well the student keeps the teacher's neighbours on the same images: the share of each query's
    k nearest neighbours (teacher's space) that are also among its k nearest in the student's space, and the
    Spearman rank correlation of the two similarity lists. Labels are not needed.

    Example: compress-edge eval agreement runs/teacher runs/distill fashion-mnist:test
    """
    from compress_edge.eval import measure

    t_desc, s_desc, result = measure.agreement(teacher, student, data, teacher_weights=teacher_weights,
                                               student_weights=student_weights, ks=sorted(set(k or [10, 100])),
                                               queries=queries, seed=seed, opts=opts)
    if as_json:
        _emit({"teacher": t_desc, "student": s_desc, "data": data, **result.to_dict()})
        return
    rows = [(f"top-{kk} overlap %", _pct(v)) for kk, v in result.overlap.items()]
    rows += [("Spearman rho (mean)", f"{result.spearman:.4f}"), ("Spearman rho (std)", f"{result.spearman_std:.4f}"),
             ("queries / images", f"{result.queries} / {result.images}")]
    _print(f"agreement of {student} ({s_desc['arch']}) with {teacher} ({t_desc['arch']}) on {data}", rows)
