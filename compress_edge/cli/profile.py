"""``compress-edge profile``: parameters, FLOPs and weight bytes of a teacher and a student."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from compress_edge.cli import app

ModelRefArg = "A compress-edge model or run folder, an exported .onnx / .engine file, or an architecture name."


def _kwargs_option(role: str, example: str) -> Any:
    """--teacher-kwargs / --student-kwargs: the same option for each model."""
    return typer.Option(f"--{role}-kwargs", help=f"Options of an architecture-name {role} as key=value (repeatable), "
                                                 f"e.g. {example}.")


def _weights_option(role: str) -> Any:
    """--teacher-weights / --student-weights: the same option for each model."""
    return typer.Option(f"--{role}-weights", help=f"A third-party checkpoint for an architecture-name {role} "
                                                  "(torchvision, MoCo, SimCLR, SwAV, DINO, Lightning): detected "
                                                  "automatically.")


@app.command("profile")
def profile(
    teacher: Annotated[str, typer.Argument(help=f"The teacher. {ModelRefArg}")],
    student: Annotated[str, typer.Argument(help=f"The student. {ModelRefArg}")],
    image_size: Annotated[int | None, typer.Option("--image-size", min=8, help="Input side in pixels for both "
                                                   "(default: each model's own; 224 for an architecture name).")] = None,
    depth: Annotated[int, typer.Option("--depth", min=0, help="Module depth of the per-module tables (1: the "
                                       "network's layers, 2: their children, ...; 0: no tables).")] = 2,
    teacher_kwargs: Annotated[list[str] | None, _kwargs_option("teacher", "small_input=false")] = None,
    student_kwargs: Annotated[list[str] | None, _kwargs_option("student", "width_mult=0.5")] = None,
    teacher_weights: Annotated[str | None, _weights_option("teacher")] = None,
    student_weights: Annotated[str | None, _weights_option("student")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of tables.")] = False,
) -> None:
    """Parameters and FLOPs (fvcore) of a teacher and a student at an input size: totals, per-module tables,
    the compression ratios (parameters, FLOPs, bytes of weights) and the embedding dimensions.

    Example: compress-edge profile resnet50 mobilenet_v2 --image-size 224
    """
    from compress_edge.cli.distill import parse_kwargs
    from compress_edge.eval.profile import FLOPS_NOTE, compare, unsupported_summary
    from compress_edge.eval.profile_ref import profile_ref

    t = profile_ref(teacher, image_size=image_size, arch_kwargs=parse_kwargs(teacher_kwargs), depth=depth,
                    weights=teacher_weights, role="teacher")
    s = profile_ref(student, image_size=image_size, arch_kwargs=parse_kwargs(student_kwargs), depth=depth,
                    weights=student_weights, role="student")
    ratios = compare(t, s)
    skipped = unsupported_summary(t, s)
    if as_json:
        typer.echo(json.dumps({"teacher": t.to_dict(), "student": s.to_dict(), "ratios": ratios,
                               "flops_note": FLOPS_NOTE, "not_counted": skipped}, indent=2))
        return
    _print(t, s, ratios, skipped, depth)


def _print(t, s, ratios: dict, skipped: str | None, depth: int) -> None:
    from rich.table import Table

    from compress_edge.cli.common import console
    from compress_edge.eval.profile import FLOPS_NOTE, human, human_bytes

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    table = Table(title=f"{FLOPS_NOTE}, one image", title_justify="left")
    for col in ("", "model", "input", "params", "FLOPs", "weights", "dim"):
        table.add_column(col, justify="left" if col in ("", "model") else "right",
                         no_wrap=col != "model", overflow="fold")
    for role, p in (("teacher", t), ("student", s)):
        name = p.name if p.name == p.arch else f"{p.name} ({p.arch})"
        table.add_row(role, name, f"{p.image_size}px", human(p.params), human(p.flops), human_bytes(p.weight_bytes),
                      str(p.embed_dim))
    console.print(table)

    def x(v: float | None) -> str:
        return f"{v:.1f}x" if v else "n/a"

    line = (f"the student is {x(ratios['flops_ratio'])} cheaper in FLOPs, with {x(ratios['params_ratio'])} fewer "
            f"parameters and {x(ratios['weight_bytes_ratio'])} fewer bytes of weights")
    if ratios.get("file_bytes_ratio"):
        line += f" ({x(ratios['file_bytes_ratio'])} smaller file)"
    for role, p in (("teacher", t), ("student", s)):
        if p.file_bytes:
            say(f"{role} file {p.name}: {human_bytes(p.file_bytes)}")
    say(f"{line}; embeddings: teacher {ratios['teacher_embed_dim']}-d, student {ratios['student_embed_dim']}-d")

    if depth > 0:
        for role, p in (("teacher", t), ("student", s)):
            table = Table(title=f"{role} by module (depth {depth}): {p.name}", title_justify="left")
            for col in ("module", "type", "params", "FLOPs", "% FLOPs"):
                # Where the table is too wide, the last header takes two lines, not a figure cut short.
                table.add_column(col, justify="left" if col in ("module", "type") else "right",
                                 no_wrap=col != "% FLOPs")
            for row in p.modules:
                share = f"{100 * row.flops / p.flops:.1f}" if p.flops else "-"
                table.add_row("  " * (row.depth - 1) + row.name, row.type, human(row.params), human(row.flops), share)
            console.print(table)
    if skipped:
        say(skipped)
