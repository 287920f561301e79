"""The command line's contract: version, help, module entry, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
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
