"""``compress-edge index build|add|remove|info``, ``compress-edge search`` and ``compress-edge classify``."""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from compress_edge.cli import app, command_group
from compress_edge.cli.common import DEVICE_METAVAR, BackendOpt
from compress_edge.errors import CompressEdgeError
from compress_edge.signals import Interrupted, StopRequest

log = logging.getLogger(__name__)

index_app = command_group(
    "index",
    "Build and change FAISS indexes of image embeddings.",
    "compress-edge index build runs/distill/student fashion-mnist:test --out runs/index",
)

IndexDirArg = Annotated[Path, typer.Argument(help="The index folder (made by 'compress-edge index build').")]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="The model that embeds the images: a .onnx file, a .engine, an OpenVINO .xml, "
                                       "or a compress-edge model folder (default: the model the index was built "
                                       "with)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", metavar=DEVICE_METAVAR, help="Where the model runs: auto (the "
                                                                             "GPU when the runtime sees one), cpu, "
                                                                             "cuda or cuda:N.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option("--param", help="Search parameter for this run, as name=value (e.g. nprobe=64, efSearch=128); "
                                 "default: the tuned ones."),
]


TrustOpt = Annotated[
    bool,
    typer.Option("--trust-model", help="Use --model even when its weights cannot be checked against the index (a "
                                       "weights hash missing on either side, or a file changed since its record)."),
]


def _console():
    from compress_edge.cli.common import console

    return console


def _text(value: Any):
    """A name that comes from data (a file, a folder, a class, a stored path) as Rich text: never read
    as markup, control characters shown as escapes (ESC as \\x1b)."""
    from rich.text import Text

    from compress_edge.retrieval.safety import shown

    return Text(shown("" if value is None else value))


@contextlib.contextmanager
def _stop_on_sigterm(what: str, index_dir: Path, again: str) -> Iterator[None]:
    """SIGTERM (sent to the process group by a scheduler or ``docker stop``) while an index changes: stop
    at once with one line. Every change is written whole (a new generation, then the sidecar, each
    atomically), so wherever it stops the index is the one from before or from after the change.
    again: how to finish the job. Without this, SIGTERM ended the process without a word."""
    try:
        with StopRequest(signals=(signal.SIGTERM,), at_once=True):
            yield
    except Interrupted:
        from compress_edge.retrieval.safety import shown

        folder = shlex.quote(str(index_dir))
        raise CompressEdgeError(
            f"{what} stopped by SIGTERM: {shown(index_dir)} holds the whole index from before or from after "
            f"the change, never a part of it ('compress-edge index info {shown(folder)}' shows which); {again}"
        ) from None


def _params(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise CompressEdgeError(f"--param takes name=value (e.g. nprobe=64), got {item!r}")
        try:
            out[name.strip()] = float(value) if "." in value else int(value)
        except ValueError:
            raise CompressEdgeError(f"--param {name} needs a number, got {value!r}") from None
    return out


def _tuning_table(info: dict[str, Any]):
    from rich.table import Table

    tuning = info.get("tuning") or {}
    k = tuning.get("k", 10)
    param = tuning.get("parameter")
    table = Table(title=f"tuning on {tuning.get('queries', 0)} held-out queries (target recall@{k} "
                        f">= {tuning.get('target_recall', 0):.2f})")
    table.add_column(param or "setting", justify="right")
    table.add_column("recall@1", justify="right")
    table.add_column(f"recall@{k}", justify="right")
    table.add_column("queries/s (all threads)", justify="right")
    chosen = (tuning.get("search_params") or {}).get(param) if param else None
    for row in tuning.get("sweep", []):
        mark = " *" if param and row["value"] == chosen else ""
        table.add_row(f"{row['value'] if row['value'] is not None else 'exact'}{mark}", f"{row['recall_at_1']:.3f}",
                      f"{row[f'recall_at_{k}']:.3f}", f"{row['qps_all_threads']:,.0f}")
    return table


def _print_info(info: dict[str, Any]) -> None:
    from rich.table import Table

    from compress_edge.retrieval.index import format_bytes

    console = _console()
    table = Table(show_header=False, title=_text(f"index {info['index_dir']}"))
    table.add_column(style="bold")
    table.add_column()
    tuning = info.get("tuning") or {}
    build = info.get("build") or {}
    k = tuning.get("k", 10)
    rows = [
        ("index", f"{info['key']} ({info['kind']}{', lists on disk' if info['on_disk'] else ''})"),
        ("vectors", f"{info['vectors']:,} x {info['dim']} dims"),
        ("model", _text(f"{info['spec']['arch']} at {info['spec']['image_size']}px "
                        f"({info.get('model') or 'not recorded'})")),
        ("labels", f"{len(info['classes'])} classes" if info["labelled"] else "none"),
        ("search parameters", ", ".join(f"{a}={b}" for a, b in info["search_params"].items()) or "none (exact)"),
        ("size", f"{format_bytes(info['bytes'] or 0)} ({(info['bytes_per_vector'] or 0):,.0f} bytes a vector)"),
    ]
    if not tuning.get("skipped") and tuning:
        met = "" if tuning.get("target_met", True) else "  (target NOT met)"
        rows += [
            (f"recall@1 / recall@{k}", f"{tuning['recall_at_1']:.3f} / {tuning[f'recall_at_{k}']:.3f}{met}"),
            ("queries/s", f"{tuning.get('qps_1_thread', 0):,.0f} at 1 thread, {tuning.get('qps_all_threads', 0):,.0f} "
                          f"at {tuning.get('threads')} threads (exact search: "
                          f"{tuning.get('exact_qps_all_threads', 0):,.0f} at {tuning.get('threads')})"),
        ]
    if build:
        embed = build.get("embed_seconds", 0.0)
        rows.append(("build", f"{build.get('seconds', 0) + embed:.1f} s: embedding {embed:.1f} s, index "
                              f"{build.get('seconds', 0):.1f} s (training {build.get('train_seconds', 0):.1f} s, "
                              f"adding {build.get('add_seconds', 0):.1f} s, then tuning)"))
    for a, b in rows:
        table.add_row(a, b)
    console.print(table)
    if tuning.get("sweep") and not tuning.get("skipped"):
        console.print(_tuning_table(info))


@index_app.command("build")
def build(
    model: Annotated[str, typer.Argument(help="The model: a compress-edge model folder, a .onnx file, a .engine, "
                                              "an OpenVINO .xml or an architecture name.")],
    data: Annotated[list[str], typer.Argument(help="Images: class folders, image folders, image files, "
                                                   "fashion-mnist:train|test (several allowed).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The index folder to write.")],
    index: Annotated[str, typer.Option("--index", help="auto (chosen by the number of vectors and the memory "
                                                       "budget) or a FAISS index_factory string, e.g. HNSW32,Flat "
                                                       "or IVF1024,SQ8.")] = "auto",
    memory_budget: Annotated[str, typer.Option("--memory-budget", help="Memory the index may take, e.g. 512M "
                                                                       "or 4G (default: half of this machine's).")] = "auto",
    target_recall: Annotated[float, typer.Option("--target-recall", help="Recall@10 against exact search the "
                                                                         "tuned search parameter must reach.")] = 0.95,
    queries: Annotated[int, typer.Option("--queries", help="Held-out queries used for tuning.")] = 1000,
    on_disk: Annotated[bool | None, typer.Option("--on-disk/--in-memory", help="IVF inverted lists on disk, "
                                                 "memory-mapped (default: when auto decides so).")] = None,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    gpu: Annotated[bool, typer.Option("--gpu", help="FAISS on the GPU(s) for training and adding, and torch "
                                                    "for exact search, when available.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 64,
    workers: Annotated[int | None, typer.Option("--workers", help="Image decoding threads.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for FAISS and the model.")] = None,
    shard_rows: Annotated[int, typer.Option("--shard-rows", help="Embeddings per shard file (an interrupted "
                                            "build continues after the last whole one).")] = 65_536,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Input size (default: the model's).")] = None,
    data_root: Annotated[str | None, typer.Option("--data-root", help="Where to look for Fashion-MNIST first.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an index already in --out.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the held-out queries and training sample.")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    weights: Annotated[str | None, typer.Option("--weights", help="A third-party checkpoint for an architecture-name "
                                                "MODEL; it is saved as a model folder in OUT/model, which the "
                                                "index then uses.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Embed images and build a tuned FAISS index (inner product on L2-normalised embeddings).

    Under torchrun each rank embeds part of the images and writes its own shards; rank 0 builds.

    Example: compress-edge index build runs/distill/student fashion-mnist:train fashion-mnist:test --out runs/index
    """
    from compress_edge.retrieval.index import SIDECAR, build_from_images, parse_bytes

    if weights is not None and (overwrite or not (out / SIDECAR).is_file()):  # else build refuses, nothing written
        model = _convert_checkpoint(model, weights, out / "model", image_size)
    with _stop_on_sigterm("index build", out, "run the same command again to build it (add --overwrite "
                          "if the folder held an index before)"):
        idx = build_from_images(
            model, data, out, backend=backend, device=device, image_size=image_size, batch_size=batch_size,
            workers=workers, shard_rows=shard_rows, data_root=data_root, progress=progress, overwrite=overwrite,
            threads=threads, index=index, memory_budget=parse_bytes(memory_budget), target_recall=target_recall,
            queries=queries, on_disk=on_disk, gpu=gpu, seed=seed,
        )
    if idx is None:  # a torchrun rank other than 0
        return
    info = idx.info()
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    _print_info(info)
    _console().print(_text(f"index written to {out}"))


def _convert_checkpoint(arch: str, weights: str, folder: Path, image_size: int | None) -> str:
    """An architecture name with a third-party checkpoint, saved as a compress-edge model folder: the index
    records that folder, so that search and add embed with the same weights."""
    from compress_edge.models.resolve import resolve_model, save_model

    model, spec = resolve_model(arch, weights=weights, image_size=image_size)
    from compress_edge.retrieval.safety import shown

    save_model(model, spec, folder)
    # On stderr with the other logs: stdout stays the table, or the JSON alone under --json.
    log.info("%s saved as a model folder in %s; the index uses it", shown(weights), shown(folder))
    return str(folder)


@index_app.command("add")
def add(
    index_dir: IndexDirArg,
    images: Annotated[list[str], typer.Argument(help="Image files or folders to add.")],
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")] = 64,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = False,
    trust_model: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Embed new images and add them to an index (images already in it are skipped).

    Example: compress-edge index add runs/index new_photos/
    """
    from compress_edge.retrieval.index import add_images

    with _stop_on_sigterm("index add", index_dir, "run the same command again to finish it (images already in "
                          "the index are skipped)"):
        result = add_images(index_dir, images, model=model, backend=backend, device=device, batch_size=batch_size,
                            progress=progress, trust_model=trust_model)
    if as_json:
        typer.echo(json.dumps(result))
        return
    _console().print(f"added {result['added']} images ({result['skipped']} already there); "
                     f"the index holds {result['ntotal']}")


@index_app.command("remove")
def remove(
    index_dir: IndexDirArg,
    paths: Annotated[list[str], typer.Argument(help="Images to remove, by path (as added, or as stored).")],
    missing_ok: Annotated[bool, typer.Option("--missing-ok", help="Ignore paths not in the index.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove images from an index (Flat and IVF indexes; an HNSW graph cannot remove).

    Example: compress-edge index remove runs/index photos/old_001.jpg
    """
    from compress_edge.retrieval.index import remove_files

    with _stop_on_sigterm("index remove", index_dir, "run the same command again with --missing-ok to finish it"):
        result = remove_files(index_dir, paths, missing_ok=missing_ok)
    if as_json:
        typer.echo(json.dumps(result))
        return
    _console().print(f"removed {result['removed']} images; the index holds {result['ntotal']}")


@index_app.command("info")
def info(
    index_dir: IndexDirArg,
    verify: Annotated[bool, typer.Option("--verify", help="Check the index file's sha256 whatever its size.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show an index: its type, size, model, search parameters and tuning results.

    Example: compress-edge index info runs/index
    """
    from compress_edge.retrieval.index import open_index

    summary = open_index(index_dir, verify=verify or None).info()
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    _print_info(summary)


@app.command("search")
def search(
    index_dir: IndexDirArg,
    queries: Annotated[list[str], typer.Argument(help="Query images (files or folders).")],
    k: Annotated[int, typer.Option("-k", min=1, help="Neighbours per query.")] = 5,
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads.")] = None,
    grid: Annotated[Path | None, typer.Option("--grid", help="Also draw the queries and their neighbours "
                                                             "(with scores and labels) into this PNG.")] = None,
    root: Annotated[str | None, typer.Option("--root", help="Where the gallery images are now, if they "
                                                            "moved since the build.")] = None,
    param: ParamOpt = None,
    trust_model: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Find the nearest gallery images of each query image.

    Example: compress-edge search runs/index query.jpg --model student.onnx -k 5 --grid results.png
    """
    from compress_edge.retrieval.search import Searcher, expand_queries

    paths = expand_queries(queries)
    with Searcher(index_dir, model, backend=backend, device=device, threads=threads, root=root,
                  params=_params(param), trust_model=trust_model) as searcher:
        results = searcher.search(paths, k=k)
    if grid is not None:
        from compress_edge.retrieval.grid import draw_grid

        draw_grid([(p, Path(p).name) for p in paths], results, grid)
    if as_json:
        typer.echo(json.dumps([{"query": p, "neighbours": [h.to_dict() for h in hits]}
                               for p, hits in zip(paths, results, strict=True)], indent=2))
        return
    from rich.table import Table

    console = _console()
    for p, hits in zip(paths, results, strict=True):
        table = Table(title=_text(p), title_justify="left")
        for col in ("rank", "score", "label", "path"):
            table.add_column(col, justify="right" if col in ("rank", "score") else "left")
        for h in hits:
            where = h.path or (f"(skipped: {h.file} is outside the gallery)" if h.file else str(h.id))
            table.add_row(str(h.rank), f"{h.score:.4f}", _text(h.label_name), _text(where))
        console.print(table)
    if grid is not None:
        console.print(_text(f"grid written to {grid}"))


@app.command("classify")
def classify(
    index_dir: IndexDirArg,
    images: Annotated[list[str], typer.Argument(help="Images to classify (files or folders).")],
    k: Annotated[int, typer.Option("-k", min=1, help="Neighbours that vote.")] = 20,
    temperature: Annotated[float, typer.Option("--temperature", "-T", help="Vote weight exp(similarity / T).")] = 0.07,
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads.")] = None,
    param: ParamOpt = None,
    trust_model: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Label images by a weighted vote of their k nearest labelled gallery images.

    Example: compress-edge classify runs/index photos/*.jpg --model student.onnx
    """
    from compress_edge.retrieval.search import Searcher, expand_queries

    if temperature <= 0:
        raise CompressEdgeError(f"--temperature must be positive, got {temperature}")
    paths = expand_queries(images)
    with Searcher(index_dir, model, backend=backend, device=device, threads=threads,
                  params=_params(param), trust_model=trust_model) as searcher:
        preds = searcher.classify(paths, k=k, temperature=temperature)
    if as_json:
        typer.echo(json.dumps([{"image": p, **pr.to_dict()} for p, pr in zip(paths, preds, strict=True)], indent=2))
        return
    from rich.table import Table

    table = Table(title=f"kNN classification (k={k}, T={temperature})")
    for col in ("image", "label", "confidence", "runner-up"):
        table.add_column(col, justify="right" if col == "confidence" else "left")
    for p, pr in zip(paths, preds, strict=True):
        others = sorted(((v, n) for n, v in pr.scores.items() if n != pr.label_name), reverse=True)
        runner = f"{others[0][1]} ({others[0][0]:.2f})" if others else ""
        table.add_row(_text(p), _text(pr.label_name or "(no labelled neighbours)"), f"{pr.confidence:.2f}",
                      _text(runner))
    _console().print(table)
