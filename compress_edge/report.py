"""The demo's report folder: ``report.md``, ``report.json`` and pictures a person can look at."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from compress_edge.storage import atomic_write_json, atomic_write_text, read_epoch_losses


def _plots(demo, folder: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = demo.results
    files: dict[str, str] = {}

    runs = [(name, losses) for name, losses in (("teacher (SimCLR)", read_epoch_losses(demo.path("teacher"))),
                                                 ("student (CompRess)", read_epoch_losses(demo.path("student"))))
            if losses]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False)
    for ax, (name, losses) in zip(axes[0], runs, strict=True):
        ax.plot(range(1, len(losses) + 1), losses, marker="o")
        ax.set_title(f"{name}: training loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=110)
    plt.close(fig)
    files["loss"] = "loss.png"

    rows = r["evaluate"]["rows"]
    names = list(rows)
    metrics = [("nn_top1", "1-NN"), ("knn20_top1", "kNN k=20"), ("linear_top1", "linear"),
               ("cluster_accuracy", "cluster")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax1.bar([j + i * width for j in range(len(metrics))], [100 * rows[name][m] for m, _ in metrics], width,
                label=name)
    ax1.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(metrics))], [t for _, t in metrics])
    ax1.set_ylabel("accuracy on the test images (%)")
    ax1.set_ylim(0, 100)
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    prof = r["profile"]
    ax2.bar(["teacher", "student"], [prof["teacher"]["flops"] / 1e6, prof["student"]["flops"] / 1e6],
            color=["tab:blue", "tab:orange"])
    ax2.set_ylabel("MFLOPs per image (fvcore)")
    ax2.set_title(f"{prof['ratios'].get('flops_ratio', float('nan')):.1f}x fewer FLOPs")
    fig.tight_layout()
    fig.savefig(folder / "accuracy_cost.png", dpi=110)
    plt.close(fig)
    files["accuracy_cost"] = "accuracy_cost.png"

    lat = r["export"]["latency"]
    backends = list(dict.fromkeys(row["backend"] for row in lat))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, batch in enumerate(sorted({row["batch"] for row in lat})):
        values = [next((row["p50_ms"] / batch for row in lat if row["backend"] == b and row["batch"] == batch), 0)
                  for b in backends]
        ax.bar([j + 0.4 * i for j in range(len(backends))], values, 0.4, label=f"batch {batch}")
    ax.set_xticks([j + 0.2 for j in range(len(backends))], backends)
    ax.set_ylabel("median ms per image")
    ax.set_title("student latency per backend (this machine)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "latency.png", dpi=110)
    plt.close(fig)
    files["latency"] = "latency.png"
    if (folder / "retrieval.png").is_file():
        files["retrieval"] = "retrieval.png"
    return files


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def verdict_line(rows: dict[str, dict[str, Any]], prof: dict[str, Any]) -> str:
    """One sentence: does the student beat both baselines, and how far is it from the teacher?"""
    student = rows["student"]["knn20_top1"]
    parts = []
    for name in ("raw pixels", "student before distillation"):
        if name in rows:
            diff = 100 * (student - rows[name]["knn20_top1"])
            parts.append(f"{diff:+.1f} points over {name}")
    gap = 100 * (rows["teacher"]["knn20_top1"] - student)
    ratio = prof.get("ratios", {}).get("flops_ratio")
    cheaper = f", at {ratio:.1f}x fewer FLOPs" if ratio else ""
    return (f"Student, weighted 20-NN: {', '.join(parts)}; {gap:.1f} points behind the teacher{cheaper}; "
            f"{rows['student'].get('bytes_per_image', '?')} bytes an image in the index against the teacher's "
            f"{rows['teacher'].get('bytes_per_image', '?')}.")


def write_report(demo) -> dict[str, Any]:
    """Write report.md, report.json and the pictures into ``demo.out/report``; returns the summary."""
    folder = demo.path("report")
    folder.mkdir(parents=True, exist_ok=True)
    r = demo.results
    pictures = _plots(demo, folder)
    prof, ev, ex, rt = r["profile"], r["evaluate"], r["export"], r["retrieval"]
    rows = ev["rows"]
    lines = [
        "# compress-edge demo report",
        "",
        f"Data: train `{ev['train']}`, test `{ev['test']}`. Settings: `{demo.path('settings.json')}`.",
        "",
        "## Teacher and student",
        "",
        "| | architecture | params | MFLOPs / image | weights MB | embedding dim |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for who in ("teacher", "student"):
        p = prof[who]
        lines.append(f"| {who} | {p['arch']} | {p['params'] / 1e6:.2f} M | {p['flops'] / 1e6:.1f} | "
                     f"{p['weight_bytes'] / 2**20:.1f} | {p['embed_dim']} |")
    lines += ["", "FLOPs as fvcore counts them (one multiply-add is one FLOP).", "",
              "## Accuracy on the test images (%), and what the embeddings cost", "",
              "Gallery: the training images. Baselines: the student before distillation (its random weights, "
              "batch-norm statistics re-estimated on the data) and plain cosine kNN on raw pixels. Spread: mean "
              "pairwise cosine of the test embeddings (near 1: collapsed) and their effective rank.", "",
              "| model | 1-NN | kNN k=20 | kNN k=200 | linear top-1 | cluster alignment | NMI | mean cosine "
              "| effective rank | floats | index bytes / image |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in rows.items():
        spread = row.get("spread", {})
        lines.append(f"| {name} | {_pct(row['nn_top1'])} | {_pct(row['knn20_top1'])} | {_pct(row['knn200_top1'])} | "
                     f"{_pct(row['linear_top1'])} | {_pct(row['cluster_accuracy'])} | {row['nmi']:.3f} | "
                     f"{spread.get('mean_cosine', float('nan')):.3f} | {spread.get('effective_rank', float('nan')):.1f} "
                     f"| {row.get('dim', '')} | {row.get('bytes_per_image', '')} |")
    lines += ["", verdict_line(rows, prof)]
    agree, before = ev["agreement"], ev["agreement_before"]
    lines += ["", "Teacher-student agreement on the test images: top-10 neighbour overlap "
              f"{agree['overlap'].get('10', float('nan')):.3f} (before distillation "
              f"{before['overlap'].get('10', float('nan')):.3f}), Spearman correlation of similarities "
              f"{agree['spearman']:.3f} (before {before['spearman']:.3f}).", "",
              "## Export", "", "| file | min cosine vs PyTorch | top-10 overlap | passed |", "| --- | ---: | ---: | --- |"]
    for name, par in ex["parity"].items():
        overlap = par.get("top10_overlap")
        lines.append(f"| {name} | {par['min_cosine']:.5f} | {'' if overlap is None else f'{overlap:.3f}'} | "
                     f"{'yes' if par['passed'] else 'no'} |")
    lines += ["", "| backend | batch | p50 ms | p95 ms |", "| --- | ---: | ---: | ---: |"]
    for row in ex["latency"]:
        lines.append(f"| {row['backend']} | {row['batch']} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} |")
    lines += ["", "## Retrieval on the device path", "",
              f"Index `{rt['key']}` of {rt['vectors']} training images "
              f"({rt.get('index_bytes_per_image') or '?'} bytes an image in the FAISS file), built with the exported "
              "ONNX model; "
              f"weighted kNN (k = 20, T = 0.07) through it classifies the {rt['queries']} test images with "
              f"{_pct(rt['knn_accuracy_through_index'])} % accuracy.", "",
              f"Browse it: `compress-edge serve {shlex.quote(str(rt['index']))}`, then open http://127.0.0.1:8000/ (search by upload "
              "or by a click on a gallery image; the same as JSON at POST /search).", ""]
    for key, title in (("loss", "Training loss"), ("accuracy_cost", "Accuracy and cost"),
                       ("latency", "Latency per backend"), ("retrieval", "Test queries and their neighbours")):
        if key in pictures:
            lines += [f"### {title}", "", f"![{title}]({pictures[key]})", ""]
    atomic_write_text(folder / "report.md", "\n".join(lines) + "\n")
    summary = {"settings": demo.settings.to_dict(), "stages": r, "pictures": pictures}
    atomic_write_json(folder / "report.json", summary)
    return {"report": str(folder / "report.md"), "pictures": pictures}
