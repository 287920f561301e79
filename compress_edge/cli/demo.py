"""``compress-edge demo``: the whole pipeline on the embedded default data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compress_edge.cli import app
from compress_edge.cli.common import console
from compress_edge.cli.distill import DataRootOpt, DeviceOpt, WorkersOpt


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="The demo folder (report, runs, exports, index).")] = Path(
        "runs/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A small run (a few minutes on a 2-core CPU).")] = False,
    teacher: Annotated[str | None, typer.Option("--teacher", help="Use this compress-edge model as the teacher "
                                                "instead of pretraining one.")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete the demo folder first and start over.")] = False,
    data_root: DataRootOpt = None,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Run the main job end to end on Fashion-MNIST: pretrain a teacher, distil a student, profile,
    evaluate, export and search. Stages already done in the folder are skipped.

    Example: compress-edge demo --out runs/demo
    """
    from compress_edge.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if quick else DemoSettings()
    settings = DemoSettings(**{**settings.to_dict(), "workers": workers, "device": device, "data_root": data_root})
    run_demo(out, settings, teacher=teacher, fresh=fresh, progress=progress)
    console.print(f"report: {out / 'report' / 'report.md'} (numbers in report.json, pictures beside it)")
