"""``compress-edge demo``: the whole pipeline on the embedded default data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compress_edge.cli import app
from compress_edge.cli.common import console
from compress_edge.cli.distill import DataRootOpt, DeviceOpt, WorkersOpt
from compress_edge.errors import CompressEdgeError


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="The demo folder (report, runs, exports, index).")] = Path(
        "runs/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A small run (a few minutes on a 2-core CPU).")] = False,
    teacher: Annotated[str | None, typer.Option("--teacher", help="Use this compress-edge model as the teacher "
                                                "instead of the shipped one.")] = None,
    pretrain_teacher: Annotated[bool, typer.Option("--pretrain-teacher", help="Pretrain the teacher here with "
                                                   "'compress-edge pretrain' (SimCLR) instead of using the one "
                                                   "shipped with the package (hours on a CPU, minutes on a "
                                                   "GPU).")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete the demo folder first and start over.")] = False,
    data_root: DataRootOpt = None,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Run the main job end to end on Fashion-MNIST: take the shipped self-supervised teacher (or
    pretrain one), distil a student, profile, evaluate against raw pixels and the student's random
    weights, export and search. Stages already done in the folder are skipped.

    Example: compress-edge demo --out runs/demo
    """
    from compress_edge.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if quick else DemoSettings()
    if teacher is not None and pretrain_teacher:
        raise CompressEdgeError("--teacher and --pretrain-teacher exclude each other: pick one")
    settings = DemoSettings(**{**settings.to_dict(), "workers": workers, "device": device, "data_root": data_root,
                               "teacher": "pretrain" if pretrain_teacher else "shipped"})
    run_demo(out, settings, teacher=teacher, fresh=fresh, progress=progress)
    console.print(f"report: {out / 'report' / 'report.md'} (numbers in report.json, pictures beside it)")
