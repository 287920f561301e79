"""What every command shares: the error boundary, --verbose, logging, the console."""

from __future__ import annotations

import errno
import inspect
import logging
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.logging import RichHandler
from typer.core import TyperGroup

from compress_edge.cli.completion import optional_shell
from compress_edge.defaults import METHODS, TEACHER_VIEWS
from compress_edge.deps import missing_package_message
from compress_edge.errors import CompressEdgeError
from compress_edge.progress import err_console  # noqa: E402,F401 - one stderr console for all

console = Console()

# Fixed choices: typer lists a Literal's values in --help (instead of <str>) and refuses any other.
# Written out here, where no heavy import is needed; tests/test_cli_vocabulary.py checks them against
# the library's own lists.
DistillMethod = Literal[METHODS]  # type: ignore[valid-type]
TeacherView = Literal[TEACHER_VIEWS]  # type: ignore[valid-type]
PretrainMethod = Literal["simclr", "moco-v2"]
Amp = Literal["auto", "bf16", "fp16", "off"]
Optimizer = Literal["sgd", "adamw"]
Backend = Literal["auto", "torch", "onnxruntime", "tensorrt", "openvino"]
Exporter = Literal["auto", "dynamo", "torchscript"]
CalibMethod = Literal["auto", "percentile", "minmax", "entropy", "dynamic"]
EngineSource = Literal["fp32", "fp16", "int8-trt"]
#: --device is open-ended (cuda:N): its forms are shown instead of <str>. Every command defaults to
#: auto: the GPU when the runtime sees one (torch: CUDA; onnxruntime: its CUDA provider), else the CPU.
DEVICE_METAVAR = "<auto|cpu|cuda|cuda:N>"

# Options several commands take with the same meaning, written once.
DataRootOpt = Annotated[str | None, typer.Option("--data-root", help="Where to look for Fashion-MNIST first.")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar=DEVICE_METAVAR, help="auto (CUDA when present), cpu, "
                                                                             "cuda or cuda:N.")]
BackendOpt = Annotated[Backend, typer.Option("--backend", help="The runtime: auto (by the model's file type), torch, "
                                                              "onnxruntime, tensorrt or openvino.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Data-loader worker processes.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
AmpOpt = Annotated[Amp, typer.Option("--amp", help="Mixed precision: auto (bf16/fp16 on GPU), bf16, fp16, off.")]
MaxStepsOpt = Annotated[int | None, typer.Option("--max-steps-per-epoch", help="Cap the steps of each epoch (quick "
                                                 "trials).")]
def batch_size_option(min_steps_per_epoch: int, smallest: int) -> Any:
    """--batch-size of a training command whose batch is chosen from the data (at most 256 images)."""
    return typer.Option("--batch-size", "-b", help=f"Images per step per process (default: auto, 256 or fewer so "
                                                   f"an epoch has {min_steps_per_epoch} steps, at least {smallest}).",
                        show_default=False)


def holdout_option(compared: str) -> Any:
    """--holdout of a training command; ``compared``: what the trained model is compared with."""
    return typer.Option("--holdout", help=f"Share of labelled images (at most 1,000) kept out of training to compare "
                                          f"{compared} at the end (quality.json); 0: none.")


def epochs_option(min_steps: int, min_epochs: int) -> Any:
    """--epochs of a training command whose run length is chosen from the data (at least these)."""
    return typer.Option("--epochs", help=f"Passes over the data (default: auto, at least {min_steps} optimizer "
                                         f"steps and {min_epochs} epochs).", show_default=False)


def lr_option(base_lr: float) -> Any:
    """--lr of a training command, scaled from ``base_lr`` per 256 images."""
    return typer.Option("--lr", help=f"SGD learning rate, warm-up then cosine (default: auto, {base_lr:g} per 256 "
                                     "images of batch).", show_default=False)


def with_options(params: tuple[tuple[str, Any, Any], ...],
                 pack: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A decorator that gives commands the options ``params`` (name, Annotated type, default) written once:
    typer sees them in the command's signature, after the command's own; the command gets ``pack(values)``
    (keyword arguments, e.g. one dataclass) instead of the values themselves."""
    import functools
    import inspect
    import typing

    names = [name for name, _, _ in params]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        hints = typing.get_type_hints(command, include_extras=True)  # the Annotated[..., typer.Option] kept
        packed = set(pack({name: default for name, _, default in params}))
        own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(command).parameters.values()
               if p.name not in packed]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)
                  for name, kind, default in params]

        @functools.wraps(command)
        def run(**kwargs: Any) -> None:
            given = {name: kwargs.pop(name) for name in names}
            command(**kwargs, **pack(given))

        del run.__wrapped__  # typer reads the signature below, not the command's own
        run.__signature__ = inspect.Signature([*own, *shared])
        run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
        return run

    return decorate


@dataclass
class RunFlags:
    """How a training command runs, the same for pretrain and distill (recorded in the run's TrainConfig)."""

    stop_after: int | None
    max_steps_per_epoch: int | None
    workers: int
    device: str
    amp: str
    seed: int
    progress: bool

    def train_kwargs(self) -> dict[str, Any]:
        """The TrainConfig fields these set."""
        return {"max_steps_per_epoch": self.max_steps_per_epoch, "workers": self.workers, "device": self.device,
                "amp": self.amp, "seed": self.seed, "progress": self.progress}


#: The options of running a training command (name, type, default), after each command's own in --help.
_RUN_PARAMS: tuple[tuple[str, Any, Any], ...] = (
    ("stop_after", Annotated[int | None, typer.Option("--stop-after", help="Train at most this many epochs in this "
                                                       "invocation, then save (resume later).")], None),
    ("max_steps_per_epoch", MaxStepsOpt, None),
    ("workers", WorkersOpt, 2),
    ("device", DeviceOpt, "auto"),
    ("amp", AmpOpt, "auto"),
    ("seed", SeedOpt, 0),
    ("progress", ProgressOpt, True),
)

#: ``@run_options``: a training command gets its run options as ``flags`` (:class:`RunFlags`).
run_options = with_options(_RUN_PARAMS, lambda values: {"flags": RunFlags(**values)})


@dataclass
class State:
    verbose: bool = False


state = State()


def setup_logging(verbose: bool) -> None:
    state.verbose = verbose
    root = logging.getLogger("compress_edge")
    root.handlers.clear()
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def train_or_resume(what: str, flags: RunFlags, *, resume: Path | None, load: Callable[[Path], Any],
                    build: Callable[[], Any], run: Callable[..., Any]) -> None:
    """The body of a training command (pretrain, distill): continue the run in ``resume`` (its options
    read back by ``load``), or start the one ``build()`` describes; ``run(opts, resume=..., stop_after_epochs=...)``
    trains. Rank 0 (the only process without torchrun) then says where ``what`` was written."""
    from compress_edge.train.distributed import current_dist, init_distributed

    init_distributed(flags.device)
    if resume is not None:
        opts = load(resume)
        opts.train.progress = flags.progress
    else:
        opts = build()
    result = run(opts, resume=resume is not None, stop_after_epochs=flags.stop_after)
    if current_dist().is_main:  # under torchrun, only rank 0 speaks
        out = Path(opts.out)
        checks = f"; checks in {out / 'quality.json'}" if (out / "quality.json").is_file() else ""
        # No step in this call (a finished run resumed): no loss to show.
        done = ("it had already finished: nothing left to train" if math.isnan(result.last_loss)
                else f"last loss {result.last_loss:.4f}, {result.seconds:.0f} s")
        console.print(f"{what} written to {out / 'student'} ({result.epochs_done} epochs, {result.global_step} "
                      f"steps, {done}){checks}")


def _fail(message: str, code: int) -> None:
    if state.verbose:
        traceback.print_exc(file=sys.stderr)
    # One line, on stderr: collapse any newline a message may hold.
    line = " ".join(str(message).split())
    print(f"error: {line}", file=sys.stderr)
    raise typer.Exit(code)


#: Old spellings of options, still accepted but left out of the help: command path -> {old: new}.
#: The one vocabulary: the network a command trains is --arch / --arch-kwargs (pretrain, distill);
#: neighbour counts are -k.
OPTION_ALIASES: dict[tuple[str, ...], dict[str, str]] = {
    ("distill",): {"--student-arch": "--arch", "--student-kwargs": "--arch-kwargs"},
    ("search",): {"--k": "-k"},
    ("classify",): {"--k": "-k"},
    ("eval", "knn"): {"--k": "-k"},
    ("eval", "agreement"): {"--k": "-k"},
}


def rewrite_aliases(args: list[str], aliases: dict[str, str]) -> list[str]:
    """``args`` with each old option spelling replaced by the current one (also in NAME=VALUE form; not
    after ``--``)."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        name, sep, value = arg.partition("=")
        if name in aliases:
            out += [aliases[name], value] if sep else [aliases[name]]
        else:
            out.append(arg)
    return out


def reflow(help_text: str | None) -> str | None:
    """A docstring's paragraphs with their line breaks taken out, for the terminal to wrap (a paragraph
    that starts with Click's ``\\b`` keeps its lines; anything after ``\\f`` is dropped)."""
    if not help_text:
        return help_text
    paragraphs = inspect.cleandoc(help_text).partition("\f")[0].strip().split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


class HelpGroup(TyperGroup):
    """A group whose help, and its commands' help, is prose that the terminal wraps.

    Typer (0.29, rich markup) keeps a docstring's line breaks, but for the first paragraph of a command's
    own help: in a terminal narrower than the source lines the help and the list of commands came out
    ragged, a short line after each source line. Reflowed once, when Typer builds the group from its
    commands (a subgroup, built first, has reflowed its own)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = reflow(self.help)
        for command in self.commands.values():
            command.help = reflow(command.help)


class ErrorBoundaryGroup(HelpGroup):
    """Turns a user's mistake into one line on stderr and exit code 1 (traceback with --verbose)."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, optional_shell(args))

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        sub = getattr(cmd, "commands", None)
        if sub is not None and rest and rest[0] in sub:  # a group: the alias table is per subcommand
            aliases = OPTION_ALIASES.get((name, rest[0]), {})
            return name, cmd, [rest[0], *rewrite_aliases(rest[1:], aliases)]
        return name, cmd, rewrite_aliases(rest, OPTION_ALIASES.get((name,), {}))

    def invoke(self, ctx):  # noqa: D401
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.BadParameter, typer.TyperException):
            raise
        except CompressEdgeError as exc:
            _fail(str(exc), 1)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # the reader went away (| head): nothing to report
            raise typer.Exit(0) from None
        except ModuleNotFoundError as exc:  # an optional package: name the extra that installs it
            message = missing_package_message(exc)
            if message is None:  # not one of ours: a bug
                _internal(exc)
            _fail(message, 1)
        except FileNotFoundError as exc:
            _fail(f"file not found: {exc.filename or exc}; check the path", 1)
        except PermissionError as exc:
            _fail(f"permission denied: {exc.filename or exc}; check the file's permissions", 1)
        except FileExistsError as exc:  # a folder asked for where a file is (--out FILE)
            _fail(f"{exc.filename or exc} already exists as a file where a folder is expected; pick another path", 1)
        except NotADirectoryError as exc:
            _fail(f"{exc.filename or exc}: part of this path is a file, not a folder; pick another path", 1)
        except IsADirectoryError as exc:
            _fail(f"{exc.filename or exc} is a folder; pass a file", 1)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                _fail(f"no space left on the disk{f' writing {exc.filename}' if exc.filename else ''}; free some "
                      "space and run the command again", 1)
            _fail(f"{exc.strerror or exc}: {exc.filename or ''} (an operating-system error)", 1)
        except Exception as exc:  # a bug, not the user's fault: still one line, traceback on demand
            if _is_usage_error(exc):
                raise
            _internal(exc)


def _internal(exc: Exception) -> None:
    _fail(
        f"internal error: {exc.__class__.__name__}: {exc} "
        "(run again with --verbose for the traceback, and please report it)",
        1,
    )


def _is_usage_error(exc: Exception) -> bool:
    """Typer's own usage errors (bad option, missing argument) carry exit code 2 and show()."""
    return hasattr(exc, "show") and hasattr(exc, "exit_code")
