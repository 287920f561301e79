"""Turn a `compress-edge pretrain` run into the teacher shipped for the demo.

    python benchmarks/ship_teacher.py runs/teacher64c --previous compress_edge/assets/fashion-mnist-teacher \
        --command "compress-edge pretrain ... --init runs/teacher64b ... --out runs/teacher64c"

Writes the run's model as float16 safetensors (the spec's sha256 updated) to
compress_edge/assets/fashion-mnist-teacher/, its provenance in the spec's ``source``: the commands
that made it (the previous teacher's, then this run's), the machine, the training seconds and epochs
added up over the chain. Refuses a run that is not a pretraining run or has no quality check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from machine import (
    describe as describe_machine,  # benchmarks/machine.py (scripts run with benchmarks/ on the path)
)

from compress_edge.models.files import load_model, save_model
from compress_edge.models.spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "compress_edge" / "assets" / "fashion-mnist-teacher"
SIZE_LIMIT = 25 * 1000 * 1000


def _run_summary(run: Path) -> tuple[float, int]:
    """Training seconds and epochs of a run, from its metrics.jsonl epoch lines."""
    seconds, epochs = 0.0, 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "epoch":
            seconds += float(row["seconds"])
            epochs = max(epochs, int(row["epoch"]))
    return seconds, epochs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the pretrain run folder")
    ap.add_argument("--command", required=True, help="the exact pretrain command that made the run")
    ap.add_argument(
        "--previous",
        type=Path,
        default=None,
        help="the shipped teacher the run started from (--init): its commands, seconds and epochs are carried on",
    )
    ap.add_argument("--machine", default=None, help="the machine, in words (default: read from this one)")
    ap.add_argument("--out", type=Path, default=ASSET)
    args = ap.parse_args(argv)

    if not (args.run / "quality.json").is_file():
        raise SystemExit(f"error: {args.run} has no quality.json: pass a finished pretrain run folder")
    model, spec = load_model(args.run / "student")
    if spec.source.get("kind") != "pretrain":
        raise SystemExit(
            f"error: {args.run} holds a {spec.source.get('kind')!r} model, not a pretraining run"
        )
    seconds, epochs = _run_summary(args.run)
    commands = [args.command]
    if args.previous is not None:
        before = ModelSpec.load(args.previous / "model.json").source
        commands.insert(0, before["command"])
        seconds += float(before["train_seconds"])
        epochs += int(before["epochs"])
    source = dict(spec.source)
    if source.get("init") and Path(source["init"]).is_absolute():
        # A path on the machine that trained it says nothing elsewhere: the repository's own files by their
        # path in it (the shipped teacher), anything else as the run folder it was.
        init = Path(source["init"]).resolve()
        source["init"] = str(init.relative_to(REPO)) if init.is_relative_to(REPO) else f"runs/{init.name}"
    source.update(
        run=args.run.name,
        command=" && ".join(commands),
        machine=args.machine or describe_machine(),
        train_seconds=int(round(seconds)),
        epochs=epochs,
        stored_as="float16",
    )
    written = save_model(model, spec.replace(source=source), args.out, half=True)
    size = (args.out / "model.safetensors").stat().st_size
    if size > SIZE_LIMIT:
        raise SystemExit(
            f"error: {args.out} is {size / 1e6:.1f} MB, over the 25 MB limit for a shipped teacher"
        )
    print(
        f"wrote {args.out}: {size / 1e6:.1f} MB, sha256 {written.weights_sha256}, {epochs} epochs, {seconds:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
