"""The command line's contract: version, help, module entry, one-line errors, exit codes."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from cli_helpers import cli_without
from typer.testing import CliRunner

from compress_edge import __version__
from compress_edge.cli import app
from compress_edge.deps import require
from compress_edge.errors import DependencyError

runner = CliRunner()


def test_version_and_module_entry():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"compress-edge {__version__}"
    out = subprocess.run([sys.executable, "-m", "compress_edge", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_help_lists_the_command_groups():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "distill", "cache-teacher", "pretrain", "data", "models", "profile", "eval", "export",
                    "bench", "index", "search", "classify"):
        assert command in result.output


def _leaf_commands(group, prefix=()):
    import typer.main

    click_group = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, cmd in click_group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _leaf_commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_command_has_help_with_an_example():
    commands = list(_leaf_commands(app))
    assert len(commands) >= 5
    for path, cmd in commands:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "Example:" in (cmd.help or ""), f"'{' '.join(path)}' has no example in its help"


def test_user_mistake_is_one_line_on_stderr_with_exit_1(tmp_path):
    missing = tmp_path / "nope"
    out = subprocess.run([sys.executable, "-m", "compress_edge", "data", "info", str(missing)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("out", "says"), [
    ("file", "already exists as a file where a folder is expected"),
    ("file/run", "part of this path is a file, not a folder"),
])
def test_an_out_folder_that_is_a_file_is_one_line(tmp_path, out, says):
    (tmp_path / "file").write_text("not a folder")
    for args in (["pretrain", "fashion-mnist:train@200"], ["index", "build", "mobilenet_v3_small", "fashion-mnist:test@20"]):
        result = subprocess.run([sys.executable, "-m", "compress_edge", *args, "--out", str(tmp_path / out)],
                                capture_output=True, text=True)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and says in lines[0], result.stderr
        assert "operating-system error" not in lines[0] and (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize(("command", "options", "says"), [
    ("distill", [], "no teacher"),
    ("distill", ["--teacher", "resnet81"], "did you mean resnet18?"),
    ("distill", ["--teacher", "runs/teacher"], "no such folder"),
    ("distill", ["--teacher", "resnet18"], "an architecture without weights"),
    ("cache-teacher", ["--teacher", "resnet81"], "did you mean resnet18?"),
    ("distill", ["--arch", "mobilenet_v9"], "did you mean mobilenet_v2?"),
    ("pretrain", ["--arch", "resnet81"], "did you mean resnet18?"),
    ("pretrain", ["--init", "runs/teacher"], "no such model folder"),
])
def test_a_wrong_model_option_is_found_before_the_images_are_read(tmp_path, make_images, command, options, says):
    """Reading a folder decodes every image (minutes for millions): a wrong --teacher, --arch or --init is
    reported first, so the scan's own warning about an unreadable file never shows."""
    images = make_images(tmp_path / "images", per_class=2)
    (images / "circle" / "broken.png").write_bytes(b"not an image")
    result = runner.invoke(app, [command, str(images), *options, "--out", str(tmp_path / "run")],
                           env={"COLUMNS": "400"})
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        line for line in result.output.strip().splitlines() if line.startswith("error: ")], result.output
    assert says in result.output and not (tmp_path / "run").exists(), result.output


def test_verbose_shows_the_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "compress_edge", "--verbose", "data", "info", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" in out.stderr and "error:" in out.stderr


def test_bad_usage_is_exit_2():
    assert runner.invoke(app, ["distill", "--epochs", "many"]).exit_code == 2
    assert runner.invoke(app, ["no-such-command"]).exit_code == 2


def test_missing_optional_package_names_the_extra():
    from compress_edge.deps import available

    if available("tensorrt"):
        pytest.skip("NVIDIA's tensorrt is installed here")
    with pytest.raises(DependencyError, match=r"compress-edge\[trt\]"):
        require("tensorrt", "building TensorRT engines")
    with pytest.raises(DependencyError, match="pip install"):
        require("compress_edge_no_such_module")




def _without(packages: str, *args: str) -> subprocess.CompletedProcess:
    return cli_without(packages, *args)


@pytest.mark.parametrize("args", [
    ["pretrain", "fashion-mnist:train", "--out", "{tmp}/run"],
    ["distill", "fashion-mnist:train", "--teacher", "resnet18", "--out", "{tmp}/run"],
    ["models", "list"],
    ["profile", "resnet18", "mobilenet_v2"],
])
def test_a_command_without_torch_says_what_to_install(tmp_path, args):
    out = _without("torch,torchvision", *[a.format(tmp=tmp_path) for a in args])
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the package 'torch'"), out.stderr
    assert "pip install torch torchvision" in lines[0] and "[device]" in lines[0]
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr


def test_a_missing_optional_package_names_its_extra(tmp_path):
    out = _without("fvcore", "profile", "mobilenet_v3_small", "mobilenet_v3_small", "--image-size", "32")
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: the package 'fvcore' this command needs is not installed; install it with: pip install fvcore "
        "(a dependency of compress-edge that the torch-free [device] install leaves out)"]


def test_every_known_module_names_an_extra_that_installs_it():
    """deps' table against pyproject.toml: an extra must exist and list the package; a core dependency must
    be one."""
    from pathlib import Path

    from compress_edge.deps import _EXTRAS, missing_package_message

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    core, extras = names(project["dependencies"]), project["optional-dependencies"]
    for module, (extra, packages) in _EXTRAS.items():
        for package in packages.split():
            where = names(extras[extra]) if extra else core
            assert package.lower() in where, (module, extra, package)
        message = missing_package_message(ModuleNotFoundError(f"No module named {module!r}", name=module))
        assert message and (f"compress-edge[{extra}]" in message if extra else f"pip install {packages}" in message)
    for sub in ("torch.nn", "faiss.contrib", "tensorrt_rtx"):  # a submodule belongs to its package
        assert missing_package_message(ModuleNotFoundError(name=sub))
    assert missing_package_message(ModuleNotFoundError(name="compress_edge.no_such")) is None  # a bug, not a package


def test_training_on_the_torch_free_install_says_what_to_install(torchfree_python, tmp_path):
    """The [device] install as a user has it (no torch at all): a training command ends in one line."""
    import os

    for args in (["pretrain", "fashion-mnist:train", "--out", str(tmp_path / "run")], ["models", "list"]):
        out = subprocess.run([str(torchfree_python), "-m", "compress_edge", *args], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert out.returncode == 1, out.stderr
        assert out.stderr.strip().splitlines() == [
            "error: the package 'torch' this command needs is not installed; install it with: pip install torch "
            "torchvision (a dependency of compress-edge that the torch-free [device] install leaves out)"], out.stderr
