"""Training runs (pretrain, distill, cache-teacher) against what users and schedulers do to them: two
runs on one folder, SIGTERM to the process group, a damaged checkpoint, hostile file names, a model
that cannot take the image size, torchrun's extra ranks. Real processes and signals throughout."""

from __future__ import annotations

import ast
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compress_edge.cli import app

runner = CliRunner()

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "compress_edge"]


def _one_line_error(result) -> str:
    out = result.output.strip().splitlines()
    errors = [line for line in out if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "internal error" not in errors[0] and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.fixture
def saved_teacher(tmp_path):
    from compress_edge.models.resolve import create_model, save_model, spec_for

    torch.manual_seed(1)
    teacher = create_model("mobilenet_v3_small", small_input=True)
    folder = tmp_path / "teacher"
    save_model(teacher, spec_for(teacher, image_size=32, source={"kind": "test"}), folder)
    return folder


@pytest.fixture
def images(tmp_path, make_images):
    return make_images(tmp_path / "images", classes=("a", "b"), per_class=6, size=32, seed=4)


def _pretrain_args(data, out, *extra):
    return ["pretrain", str(data), "--arch", "mobilenet_v3_small", "--image-size", "32", "--batch-size", "4",
            "--holdout", "0", "--workers", "0", "--no-progress", "--device", "cpu", "--out", str(out), *extra]


# ----------------------------------------------------------------------------------------------
# 1. one writer per run folder
# ----------------------------------------------------------------------------------------------
_HOLD = textwrap.dedent("""
    import sys
    from compress_edge.storage import folder_lock
    with folder_lock(sys.argv[1], what="pretrain"):
        print("held", flush=True)
        sys.stdin.read()
""")


@pytest.fixture
def held_folder(tmp_path):
    """A run folder whose lock another live process holds (a first run still going)."""
    folder = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    yield folder, proc.pid
    proc.stdin.close()
    proc.wait(timeout=30)


def _command(kind, images, out, teacher, epochs=1, workers=0):
    if kind == "pretrain":
        return [*_pretrain_args(images, out, "--epochs", str(epochs)), "--workers", str(workers)]
    if kind == "distill":
        return ["distill", str(images), "--teacher", str(teacher), "--arch", "mobilenet_v3_small", "--epochs", str(epochs),
                "--batch-size", "4", "--queue-size", "8", "--holdout", "0", "--workers", str(workers),
                "--no-progress", "--device", "cpu", "--out", str(out)]
    return ["cache-teacher", str(images), "--teacher", str(teacher), "--workers", "0", "--no-progress",
            "--device", "cpu", "--out", str(out)]


@pytest.mark.parametrize("kind", ["pretrain", "distill", "cache-teacher"])
def test_a_second_writer_of_a_folder_is_refused_naming_the_holder(held_folder, images, saved_teacher, kind):
    folder, pid = held_folder
    before = sorted(p.name for p in folder.iterdir())
    result = runner.invoke(app, _command(kind, images, folder, saved_teacher))
    assert result.exit_code == 1, result.output
    line = _one_line_error(result)
    assert "in use by another process" in line and f"pid {pid}" in line, line
    assert sorted(p.name for p in folder.iterdir()) == before == [".lock"]  # nothing written


@pytest.mark.parametrize("kind", ["pretrain", "distill"])
def test_a_run_refused_at_its_start_leaves_no_folder_behind(tmp_path, images, saved_teacher, kind):
    """A wrong option found after the folder's lock was taken: the folder the run made goes away again
    (one that was there before stays, and so does anything in it)."""
    bad = ["--arch-kwargs", "width=3"]
    made = tmp_path / "new"
    result = runner.invoke(app, [*_command(kind, images, made, saved_teacher), *bad])
    assert result.exit_code == 1 and "does not take width" in _one_line_error(result), result.output
    assert not made.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    result = runner.invoke(app, [*_command(kind, images, kept, saved_teacher), *bad])
    assert result.exit_code == 1 and sorted(p.name for p in kept.iterdir()) == [".lock", "notes.txt"]


def test_a_resume_while_the_run_is_going_is_refused(tmp_path, images):
    out = tmp_path / "run"
    assert runner.invoke(app, _pretrain_args(images, out, "--epochs", "1")).exit_code == 0
    # The run finished; another process now holds its folder (a second --resume started first).
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        stamp = (out / "checkpoints" / "last.pt").stat().st_mtime_ns
        result = runner.invoke(app, ["pretrain", "--resume", str(out), "--no-progress"])
        assert result.exit_code == 1 and f"pid {holder.pid}" in _one_line_error(result)
        assert (out / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # Once the holder is gone, the lock is free again (however it ended).
    assert runner.invoke(app, ["pretrain", "--resume", str(out), "--no-progress"]).exit_code == 0


# ----------------------------------------------------------------------------------------------
# 2. SIGTERM to the process group (docker stop, job schedulers) with data-loader workers
# ----------------------------------------------------------------------------------------------
def _wait_for_step_record(path, proc, timeout=180):
    """Until metrics.jsonl holds a step's record (every 10 steps: mid-epoch, loader workers running)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and '"kind": "train"' in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    raise AssertionError("the run logged nothing in time")


@pytest.mark.parametrize("kind", ["pretrain", "distill"])
def test_sigterm_to_the_process_group_saves_and_the_run_resumes(tmp_path, images, saved_teacher, kind):
    out = tmp_path / "run"
    cmd = [*CLI, *_command(kind, images, out, saved_teacher, epochs=500, workers=1)]
    # Its own session, so that its process group holds only the run and its loader workers.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    try:
        _wait_for_step_record(out / "metrics.jsonl", proc)
        os.killpg(proc.pid, signal.SIGTERM)  # what `kill -TERM -- -PGID` and docker stop send
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err
    assert "stop requested (SIGTERM)" in err and "--resume" in err, err
    assert "internal error" not in err and "Traceback" not in err and "DataLoader worker" not in err, err
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < state["global_step"] < 500 * 3
    resumed = runner.invoke(app, [kind, "--resume", str(out), "--stop-after", "1", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    after = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert after["global_step"] > state["global_step"] and after["epoch"] == state["epoch"] + 1


def test_sigterm_to_the_process_group_stops_cache_teacher_after_a_shard_and_a_rerun_continues(
        tmp_path, make_images, saved_teacher):
    images = make_images(tmp_path / "many", classes=("a", "b"), per_class=20, size=32, seed=5)
    out = tmp_path / "cache"
    args = ["cache-teacher", str(images), "--teacher", str(saved_teacher), "--views", "2", "--shard-rows", "2",
            "--batch-size", "2", "--no-progress", "--device", "cpu", "--out", str(out)]
    proc = subprocess.Popen([*CLI, *args, "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (out / "emb-00000.npy").is_file():  # a shard written: loader workers are running
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "no shard written in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err
    assert "stop requested (SIGTERM)" in err and err.count("stop requested") == 1, err
    line = [row for row in err.splitlines() if row.startswith("error:")]
    assert len(line) == 1 and "run the same cache-teacher command again" in line[0], err
    assert "internal error" not in err and "Traceback" not in err and "DataLoader worker" not in err, err
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".tmp")] and "meta.json" not in names, names
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*-*.npy")}
    shards = [n for n in kept if n.startswith("emb-")]
    assert 1 <= len(shards) < 20 and len(kept) == 2 * len(shards), names  # every shard whole: emb and params

    rerun = runner.invoke(app, [*args, "--workers", "0"])
    assert rerun.exit_code == 0, rerun.output
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # continued, not started over
    fresh = tmp_path / "fresh"
    assert runner.invoke(app, [*args[:-1], str(fresh), "--workers", "0"]).exit_code == 0
    from compress_edge.train.teacher_cache import open_cache

    a, b = open_cache(out), open_cache(fresh)
    assert len(a) == len(b) == 40 and a.meta["fingerprint"] == b.meta["fingerprint"]
    for view in (0, 1):
        assert np.allclose(a.all_embeddings(view), b.all_embeddings(view), atol=2e-3)  # float16, other process
    assert all((a.params(i, v) == b.params(i, v)).all() for i in range(len(a)) for v in (0, 1))


# ----------------------------------------------------------------------------------------------
# 3. a damaged last.pt: the checkpoint before it is kept and used
# ----------------------------------------------------------------------------------------------
def test_a_damaged_last_checkpoint_resumes_from_the_previous_one(tmp_path, images):
    out = tmp_path / "run"
    result = runner.invoke(app, _pretrain_args(images, out, "--epochs", "3", "--stop-after", "2"))
    assert result.exit_code == 0, result.output
    last, previous = out / "checkpoints" / "last.pt", out / "checkpoints" / "previous.pt"
    kept = torch.load(previous, weights_only=True)
    assert kept["epoch"] == 1 and torch.load(last, weights_only=True)["epoch"] == 2
    assert oct(previous.stat().st_mode & 0o777) == oct(last.stat().st_mode & 0o777)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a disk that filled, a copy cut short

    result = runner.invoke(app, ["pretrain", "--resume", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "previous.pt" in result.output and "cannot read checkpoint" in result.output, result.output
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 3 and state["global_step"] == 3 * kept["global_step"]
    # The damaged file was put aside, not rotated in: previous.pt is the good epoch-2 checkpoint.
    assert torch.load(previous, weights_only=True)["epoch"] == 2
    assert (out / "checkpoints" / "last.damaged.pt").is_file()

    for path in (last, previous):  # both damaged: nothing to resume from, said in one line
        path.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["pretrain", "--resume", str(out), "--no-progress"])
    assert result.exit_code == 1 and "start a new run" in _one_line_error(result)


# ----------------------------------------------------------------------------------------------
# 4. suggested code and commands quote the names they hold
# ----------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling it runs code (opens a file for writing): what weights_only=True refuses."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_suggested_conversion_quotes_a_hostile_file_name(tmp_path, images):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "evil"
    folder.mkdir()
    path = folder / "x'),__import__('os').system('id'),('.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Payload(str(marker))}, path)
    result = runner.invoke(app, ["distill", str(images), "--teacher", "resnet18", "--teacher-weights", str(path),
                                 "--workers", "0", "--no-progress", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    line = _one_line_error(result)
    assert not marker.exists()
    code = line[line.index("ckpt = torch.load("): line.index("; sd = ")]
    tree = ast.parse(code)  # what a user would paste: one assignment of one torch.load call
    assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Assign)
    call = tree.body[0].value
    assert isinstance(call, ast.Call) and ast.unparse(call.func) == "torch.load"
    assert [ast.literal_eval(a) for a in call.args] == [str(path)]
    assert [(k.arg, ast.literal_eval(k.value)) for k in call.keywords] == [("weights_only", False)]


def test_the_suggested_resume_command_quotes_the_run_folder(tmp_path, images):
    out = tmp_path / "run $(touch pwned) 'x'"
    assert runner.invoke(app, _pretrain_args(images, out, "--epochs", "1")).exit_code == 0
    result = runner.invoke(app, _pretrain_args(images, out, "--epochs", "1"))
    line = _one_line_error(result)
    suggested = line[line.index("--resume ") + len("--resume "): line.index(", or pick")]
    assert shlex.split(suggested) == [str(out)], line


# ----------------------------------------------------------------------------------------------
# 5. an architecture that cannot take the image size is refused before training
# ----------------------------------------------------------------------------------------------
def test_alexnet_at_32px_without_its_small_stem_is_refused_with_the_smallest_size(tmp_path, images):
    from compress_edge.models.resolve import create_model

    out = tmp_path / "run"
    args = _pretrain_args(images, out, "--epochs", "1")
    args[args.index("mobilenet_v3_small")] = "alexnet"
    result = runner.invoke(app, [*args, "--arch-kwargs", "small_input=false"])
    assert result.exit_code == 1, result.output
    line = _one_line_error(result)
    assert "alexnet cannot take 32px images" in line and "small_input=true" in line, line
    smallest = int(line.split("at least ")[1].split("px")[0])
    model = create_model("alexnet", small_input=False).eval()
    with torch.no_grad():  # the size named is the smallest that really works
        assert model(torch.zeros(1, 3, smallest, smallest)).shape[0] == 1
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, smallest - 1, smallest - 1))
    assert not (out / "checkpoints").exists() and not (out / "config.json").exists()


# ----------------------------------------------------------------------------------------------
# 6. a damaged ModelSpec is refused naming its file; the weights get the mode of every other file
# ----------------------------------------------------------------------------------------------
def test_a_model_json_that_is_not_json_is_refused_naming_the_file(tmp_path, images, saved_teacher):
    spec = saved_teacher / "model.json"
    spec.write_text(spec.read_text()[:-20])  # cut short
    result = runner.invoke(app, ["distill", str(images), "--teacher", str(saved_teacher), "--workers", "0",
                                 "--no-progress", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    line = _one_line_error(result)
    assert str(spec) in line and "not valid JSON" in line, line


def test_a_spec_in_metadata_that_is_not_json_is_refused_naming_the_file(tmp_path, saved_teacher):
    from safetensors.torch import load_file, save_file

    from compress_edge.errors import ModelError
    from compress_edge.models.resolve import SPEC_METADATA_KEY, load_model
    from compress_edge.models.spec import ModelSpec

    weights = tmp_path / "bare" / "student.safetensors"  # no model.json beside it: the spec inside is used
    weights.parent.mkdir()
    save_file(load_file(saved_teacher / "model.safetensors"), str(weights), metadata={SPEC_METADATA_KEY: "{oops"})
    with pytest.raises(ModelError, match=rf"the ModelSpec in the metadata of {weights}\b.*not valid JSON"):
        load_model(weights)
    # ONNX metadata_props take the same path: the ONNX readers pass their file as ``where``.
    with pytest.raises(ModelError, match=r"the metadata of model\.onnx is not valid JSON"):
        ModelSpec.from_metadata({"compress_edge.models.spec": "{oops"}, where="model.onnx")


def test_the_weights_file_gets_the_same_mode_as_every_other_file(tmp_path, images):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert runner.invoke(app, _pretrain_args(images, out, "--epochs", "1")).exit_code == 0
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (out / "student").iterdir()}
    assert modes == {"model.safetensors": "0o644", "model.json": "0o644"}, modes


# ----------------------------------------------------------------------------------------------
# 7. torchrun: only rank 0 speaks
# ----------------------------------------------------------------------------------------------
def test_under_torchrun_only_rank_0_prints_logs_bars_and_the_result(tmp_path, images):
    out = tmp_path / "run"
    args = _pretrain_args(images, out, "--epochs", "1", "--batch-size", "2")
    args[args.index("--no-progress")] = "--progress"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "compress_edge"]
    run = subprocess.run([*torchrun, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("pretraining mobilenet_v3_small") == 1, run.stderr
    assert run.stderr.count("epoch 1/1") <= 1, run.stderr  # rank 0's bar (if drawn at all off a terminal)
    assert run.stdout.count("model written to") == 1, run.stdout


LOADER_UNDER_SIGTERM = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch.utils.data import Dataset, Sampler
    from compress_edge.data.loaders import StopSafeLoader

    class Report(Dataset):  # each item: how the worker that loads it treats SIGTERM
        def __len__(self):
            return 8
        def __getitem__(self, i):
            ignored = signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            held = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            return torch.tensor([i, int(ignored), int(held), int(os.environ["STARTED"])])

    class SignalWhileWorkersStart(Sampler):  # the loader asks for indices right after forking its workers
        def __iter__(self):
            os.killpg(os.getpgid(0), signal.SIGTERM)
            return iter(range(8))
        def __len__(self):
            return 8

    def started(worker_id):
        os.environ["STARTED"] = "1"

    seen = []
    signal.signal(signal.SIGTERM, lambda *_: seen.append("main"))
    os.environ["STARTED"] = "0"
    for round_ in range(int(sys.argv[1])):
        loader = StopSafeLoader(Report(), batch_size=2, sampler=SignalWhileWorkersStart(), num_workers=2, timeout=60,
                                worker_init_fn=started)
        rows = torch.cat(list(loader))
        assert rows[:, 0].tolist() == list(range(8)), rows
        assert rows[:, 1:].tolist() == [[1, 0, 1]] * 8, rows  # ignored, not held, the user's init ran
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the main process's mask restored
    print(len(seen))
""")


def test_loader_workers_never_die_of_a_sigterm_sent_while_they_start(tmp_path):
    # The race behind "DataLoader worker exited unexpectedly" after a SIGTERM to the process group: a
    # worker forked just before the signal died of it before its worker_init_fn could ignore it. Here
    # every round signals the group while the workers start; all batches must arrive and the main
    # process must see each signal once.
    script = tmp_path / "loader_under_sigterm.py"
    script.write_text(LOADER_UNDER_SIGTERM)
    rounds = 10
    done = subprocess.run([sys.executable, str(script), str(rounds)], capture_output=True, text=True, env=ENV,
                          timeout=300, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == str(rounds), done.stdout
