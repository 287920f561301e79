"""One vocabulary across commands: every option a message, help text or the README names exists;
fixed choices are listed in --help; old spellings still parse; shell completion installs."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from compress_edge.cli import app
from compress_edge.cli.common import DEVICE_METAVAR, OPTION_ALIASES, rewrite_aliases
from compress_edge.errors import CompressEdgeError

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
WIDE = {"COLUMNS": "400", "NO_COLOR": "1"}

#: '--name' where it starts an option: not in the middle of a word or of another option.
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")

#: Options of other programs that the README and messages quote, by program.
OTHER_TOOLS = {
    "--nproc-per-node": "torchrun",
    "--standalone": "torchrun",
    "--no-deps": "pip",
    "--porcelain": "git status",
    "--untracked-files": "git status",
    "--reinstall": "apt-get",
}


def _commands(cmd=None, path=()):
    cmd = cmd or typer.main.get_command(app)
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def _options(cmd) -> set[str]:
    names = {"--help"}
    for p in cmd.params:
        names.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
    return names


def _all_options() -> set[str]:
    return set().union(*(_options(cmd) for _, cmd in _commands()))


def _script_options() -> set[str]:
    """Options of the benchmark and example scripts (argparse; a shell script's ``== "--name"`` tests),
    which the README also documents."""
    found = set()
    for script in [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py")]:
        found.update(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", script.read_text()))
    for script in ROOT.glob("benchmarks/*.sh"):
        found.update(re.findall(r"==\s*\"(--[\w-]+)\"", script.read_text()))
    return found


def _named(files) -> list[tuple[str, str]]:
    out = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            out += [(f"{path.relative_to(ROOT)}:{number}", name) for name in OPTION.findall(line)]
    return out


def test_every_option_named_in_the_package_exists():
    have = _all_options()
    aliases = {old for table in OPTION_ALIASES.values() for old in table}
    sources = [p for d in ("compress_edge", "export", "retrieval") for p in sorted((ROOT / d).rglob("*.py"))]
    missing = [
        f"{where}: {name}" for where, name in _named(sources)
        if name not in have and name not in OTHER_TOOLS
        and not (where.startswith("compress_edge/cli/common.py") and name in aliases)  # the alias table itself
    ]
    assert not missing, "options no command has:\n" + "\n".join(missing)


def test_every_option_the_readme_names_exists():
    have = _all_options() | _script_options()
    missing = [f"{where}: {name}" for where, name in _named([ROOT / "README.md"])
               if name not in have and name not in OTHER_TOOLS]
    assert not missing, "options the README names that nothing has:\n" + "\n".join(missing)


def test_the_option_check_can_fail():
    assert "--teacher-arch" not in _all_options()  # named in old messages; no command has it
    assert [n for _, n in _named([Path(__file__)]) if n == "--teacher-arch"]


def _command(*path):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize("args, command", [
    (["profile", "{ckpt}", "mobilenet_v2"], ("profile",)),
    (["profile", "mobilenet_v2", "{ckpt}"], ("profile",)),
    (["eval", "knn", "{ckpt}", "--train", "x", "--test", "y"], ("eval", "knn")),
    (["eval", "agreement", "{ckpt}", "mobilenet_v2", "x"], ("eval", "agreement")),
    (["bench", "{ckpt}"], ("bench",)),
    (["index", "build", "{ckpt}", "x", "--out", "{ckpt}.idx"], ("index", "build")),
])
def test_a_refusal_names_options_of_the_command_that_refused(tmp_path, args, command):
    """A third-party checkpoint given as a model: the fix the message names is an option of this command."""
    ckpt = tmp_path / "moco.pth"
    ckpt.write_bytes(b"not read")
    result = runner.invoke(app, [a.format(ckpt=ckpt) for a in args], env=WIDE)
    assert result.exit_code == 1, result.output
    named = set(OPTION.findall(result.output))
    assert named and "weights" in " ".join(named), result.output
    assert named <= _options(_command(*command)), (named - _options(_command(*command)), result.output)


def _literal_choices(param) -> tuple[str, ...] | None:
    annotation = param.type_descriptor.annotation
    for candidate in (annotation, *typing.get_args(annotation)):  # Literal[...] | None too
        if typing.get_origin(candidate) is typing.Literal:
            return typing.get_args(candidate)
    return None


#: Options whose values are a fixed list, wherever they appear.
CHOICE_OPTIONS = {"--method", "--amp", "--optimizer", "--backend", "--exporter", "--calib-method", "--trt-from"}


def test_help_lists_the_choices():
    checked = 0
    for path, cmd in _commands():
        if getattr(cmd, "commands", None) is not None:
            continue
        help_text = runner.invoke(app, [*path, "--help"], env=WIDE).output
        for param in cmd.params:
            names = set(param.opts)
            if getattr(param, "hidden", False):
                continue
            choices = _literal_choices(param)
            if names & CHOICE_OPTIONS:
                assert choices, f"{' '.join(path)} {param.opts[0]} takes any string"
            if choices:
                assert f"<{'|'.join(choices)}>" in help_text, (path, param.opts, help_text)
                checked += 1
            if "--device" in names:
                assert param.metavar == DEVICE_METAVAR and DEVICE_METAVAR in help_text, path
                assert param.default == "auto", f"{' '.join(path)} --device defaults to {param.default!r}"
                checked += 1
    assert checked >= 20


def _ragged_lines(help_output: str) -> list[str]:
    """Lines of the Commands panel where a summary broke early: the next line's first word would have
    fitted (a source line break kept), instead of the terminal's own wrapping."""
    lines = help_output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("╭") and "Commands" in line)
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("│"):
            break
        rows.append(line)
    first_summary = rows[0][1:].split(maxsplit=1)[1]  # the first row: "│ NAME   SUMMARY ... │"
    column = len(rows[0]) - len(first_summary)  # where the summaries start
    width = len(rows[0]) - 2 - column  # up to the panel's right padding and edge
    ragged = []
    for line, following in zip(rows, rows[1:], strict=False):
        if following[1:column].strip():  # the next command's row
            continue
        text, next_word = line[column:-1].rstrip(), following[column:-1].split()[0]
        if len(text) + 1 + len(next_word) <= width:
            ragged.append(f"{text} | {next_word}")
    return ragged


def _ragged_prose(help_output: str, width: int = 80) -> list[str]:
    """Lines of the text between "Usage:" and the first panel that broke early (see _ragged_lines); the
    text sits between a one-column margin on each side."""
    lines = help_output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:"))
    end = next((i for i, line in enumerate(lines) if line.startswith("╭")), len(lines))
    text = [line.strip() for line in lines[start + 1:end]]
    return [f"{line} | {following.split()[0]}" for line, following in zip(text, text[1:], strict=False)
            if line and following and len(line) + 1 + len(following.split()[0]) <= width - 2]


def test_help_is_prose_the_terminal_wraps():
    """Each command's help and each group's list of commands, 80 columns wide: no line ends where the
    next word would have fitted (Typer keeps a docstring's source line breaks unless told otherwise)."""
    paths = [path for path, _ in _commands()]
    assert len(paths) >= 25
    for path in paths:
        output = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80", "NO_COLOR": "1"}).output
        assert not _ragged_prose(output), (path, _ragged_prose(output))
        if "Commands" in output:
            assert not _ragged_lines(output), (path, _ragged_lines(output))
    # The checks can fail: a paragraph or a summary broken where its source line broke is found; one
    # wrapped where the next word did not fit is not.
    prose = ["Usage: compress-edge demo", "", "Run the main job (or", "pretrain one).", "", "x" * 75, "more"]
    assert _ragged_prose("\n".join(prose)) == ["Run the main job (or | pretrain"]
    cells = [("demo", "Run the main job (or"), ("", "pretrain one), distil a student."),
             ("eval", "Measure frozen embeddings: kNN, a linear"), ("", "probe and agreement.")]
    panel = ["╭─ Commands " + "─" * 38 + "╮", *(f"│ {name:6} {text:40} │" for name, text in cells), "╰" + "─" * 49 + "╯"]
    assert _ragged_lines("\n".join(panel)) == ["Run the main job (or | pretrain"]


def test_choices_match_the_library():
    from compress_edge.export.calibration import AUTO, CALIB_METHODS, DYNAMIC
    from compress_edge.export.onnx import EXPORTERS
    from compress_edge.export.runtimes import BACKENDS

    from compress_edge.defaults import METHODS
    from compress_edge.train.optim import OPTIMIZERS
    from compress_edge.train.pretrain import PRETRAIN_METHODS

    def choices(path, option):
        param = next(p for p in _command(*path).params if option in p.opts)
        return set(_literal_choices(param))

    assert choices(("distill",), "--method") == set(METHODS)
    assert choices(("pretrain",), "--method") == set(PRETRAIN_METHODS)
    assert choices(("distill",), "--optimizer") == set(OPTIMIZERS)
    assert choices(("export",), "--exporter") == set(EXPORTERS)
    assert choices(("export",), "--calib-method") == {AUTO, *CALIB_METHODS, DYNAMIC}
    for path in (("bench",), ("search",), ("classify",), ("index", "build"), ("index", "add")):
        assert choices(path, "--backend") == {"auto", *BACKENDS}, path


def test_a_value_off_the_list_is_bad_usage():
    result = runner.invoke(app, ["distill", "x", "--amp", "fp8"], env=WIDE)
    assert result.exit_code == 2 and "fp8" in result.output


def test_rewrite_aliases():
    table = {"--student-arch": "--arch", "--k": "-k"}
    assert rewrite_aliases(["d", "--student-arch", "a", "--k=3", "--", "--k"], table) == \
        ["d", "--arch", "a", "-k", "3", "--", "--k"]


@pytest.mark.parametrize("args, hidden", [
    (["distill", "--student-arch", "resnet18", "--student-kwargs", "width_mult=0.5"], ["--student-arch", "--student-kwargs"]),
    (["search", "idx", "q.png", "--k", "3"], ["--k "]),
    (["classify", "idx", "q.png", "--k=3"], ["--k "]),
    (["eval", "knn", "m", "--test", "t", "--k", "5", "--k", "7"], ["--k "]),
    (["eval", "agreement", "t", "s", "d", "--k", "5"], ["--k "]),
    (["export", "m", "--onnx"], ["--onnx"]),
])
def test_old_spellings_parse_and_stay_out_of_the_help(args, hidden):
    result = runner.invoke(app, [*args, "--help"], env=WIDE)  # an unknown option would be exit 2
    assert result.exit_code == 0, result.output
    for name in hidden:
        assert name not in result.output


def test_old_distill_spellings_reach_the_run(monkeypatch, tmp_path):
    import compress_edge.train.distill as distill_mod

    seen = {}

    def fake_run(opts, **_):
        seen.update(arch=opts.student_arch, kwargs=opts.student_kwargs, method=opts.method)
        raise CompressEdgeError("stopped by the test")

    monkeypatch.setattr(distill_mod, "run_distill", fake_run)
    monkeypatch.setattr("compress_edge.train.distributed.init_distributed", lambda device: None)
    for spelling in (["--student-arch", "resnet18", "--student-kwargs", "width_mult=0.5"],
                     ["--arch", "resnet18", "--arch-kwargs", "width_mult=0.5"]):
        seen.clear()
        result = runner.invoke(app, ["distill", "imgs", "--teacher", "t", *spelling, "--method", "regression",
                                     "--out", str(tmp_path / "run")])
        assert "stopped by the test" in result.output
        assert seen == {"arch": "resnet18", "kwargs": {"width_mult": 0.5}, "method": "regression"}


def test_shell_completion_shows_and_completes(tmp_path):
    env = {**os.environ, **WIDE, "SHELL": "/bin/bash", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "compress_edge"]
    # The shell named is the one served, whatever runs this test (bash, most likely).
    shown = subprocess.run([*cli, "--show-completion", "bash"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "complete -o default -F" in shown.stdout, shown.stderr
    zsh = subprocess.run([*cli, "--show-completion", "zsh"], capture_output=True, text=True, env=env)
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef"), zsh.stderr
    bad = subprocess.run([*cli, "--show-completion", "tcsh"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "not a shell with completion" in bad.stderr and "zsh" in bad.stderr, bad.stderr
    installed = subprocess.run([*cli, "--install-completion", "bash"], capture_output=True, text=True, env=env)
    assert installed.returncode == 0, installed.stderr
    assert "compress" in (tmp_path / ".bashrc").read_text()
    # What bash asks when the user presses tab after 'distill --amp '.
    ask = {**env, "_COMPRESS_EDGE_COMPLETE": "complete_bash", "COMP_WORDS": "compress-edge distill --amp ",
           "COMP_CWORD": "3"}
    script = Path(sys.executable).with_name("compress-edge")  # the installed command: its name picks the variable
    if not script.is_file():
        pytest.skip("compress-edge is not installed as a command beside this Python")
    completed = subprocess.run([str(script)], capture_output=True, text=True, env=ask)
    assert completed.stdout.split() == ["auto", "bf16", "fp16", "off"], completed


#: Run a command from a process whose parent has exited, so that no shell is among its parents (as under a
#: container's entry point or a job runner); print what shellingham finds there, then the command's output.
ORPHAN = """
import os, subprocess, sys, time
if os.fork():
    os._exit(0)
time.sleep(0.2)  # the parent is gone: this process now hangs from init (or a subreaper)
out = sys.argv[1]
try:
    import shellingham
    found = shellingham.detect_shell()[0]
except Exception:
    found = ""
done = subprocess.run(sys.argv[2:], capture_output=True, text=True)
with open(out + ".part", "w") as f:
    f.write(repr((found, done.returncode, done.stdout, done.stderr)))
os.replace(out + ".part", out)
"""


def _orphan(tmp_path, name, args, env):
    out = tmp_path / name
    subprocess.run([sys.executable, "-c", ORPHAN, str(out), sys.executable, "-m", "compress_edge", *args],
                   env=env, check=True)
    deadline = time.monotonic() + 120
    while not out.exists():
        assert time.monotonic() < deadline, f"{name}: the orphaned command did not finish"
        time.sleep(0.2)
    return ast.literal_eval(out.read_text())


def test_completion_without_a_parent_shell_falls_back_to_SHELL_then_asks_for_the_name(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SHELL"}
    env.update(WIDE, HOME=str(tmp_path), OMP_NUM_THREADS="1")
    found, code, out, err = _orphan(tmp_path, "fish", ["--show-completion"], {**env, "SHELL": "/usr/bin/fish"})
    if found:
        pytest.skip(f"a shell ({found}) is among the parents of every process here, even an orphan's")
    assert code == 0 and out.startswith("complete --command"), (out, err)  # fish's script, from $SHELL
    found, code, out, err = _orphan(tmp_path, "none", ["--show-completion"], env)
    assert code == 2 and "could not tell which shell this is" in err and "--show-completion bash" in err, err
    # Named, it needs no detection at all.
    found, code, out, err = _orphan(tmp_path, "named", ["--install-completion", "bash"], env)
    assert code == 0 and "bash completion installed" in out, (out, err)
    assert "compress_edge" in (tmp_path / ".bashrc").read_text()
