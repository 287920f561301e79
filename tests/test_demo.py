"""The main job end to end, at a size smaller than --quick: every stage runs, the report is written,
a second run skips every stage, and a folder made with other settings is refused. SIGTERM to the
demo's process group stops it with one line, and the same command then continues and finishes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress_edge.demo import Demo, DemoSettings, DemoStopped, Stage, longer_distill, run_demo
from compress_edge.errors import CompressEdgeError

TINY = dict(train_data="fashion-mnist:train@256", test_data="fashion-mnist:test@64", teacher_epochs=1,
            teacher_batch=64, distill_epochs=1, distill_batch=64, queue_size=128, calib_images=16,
            search_queries=2)

# `compress-edge demo --quick` in its own process, with --quick's settings shrunk to TINY (and the teacher
# cache in 2 shards, as --quick's is) so that a whole run fits the test suite: the command line, the
# stages and the signals are the real ones.
TINY_CLI = ("import json, sys\n"
            "from compress_edge import demo\n"
            "from compress_edge.demo import DemoSettings\n"
            "quick, tiny = DemoSettings.quick, json.loads(sys.argv[1])\n"
            "DemoSettings.quick = classmethod(lambda cls, **kw: quick(**{**tiny, **kw}))\n"
            "demo.DEMO_CACHE_SHARD_ROWS = 128\n"
            "sys.argv = ['compress-edge', *sys.argv[2:]]\n"
            "from compress_edge.cli import main\n"
            "main()\n")


def demo_cli(out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(COLUMNS="400", NO_COLOR="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", TINY_CLI, json.dumps(TINY), "demo", "--quick", "--out", str(out),
                             "--workers", "0", "--device", "cpu", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def sigterm_once(proc: subprocess.Popen, marker: Path, timeout: float = 300) -> tuple[str, str]:
    """SIGTERM to the process group of ``proc`` as soon as ``marker`` exists; its output."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"ended before {marker} appeared: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{marker} never appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    return proc.communicate(timeout=300)


@pytest.mark.slow
def test_demo_stopped_by_sigterm_continues_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    # stopped while the teacher cache is being built (its stage 2 of 8)
    proc = demo_cli(out)
    stdout, stderr = sigterm_once(proc, out / "teacher-cache" / "building.json")
    assert proc.returncode == 1, (proc.returncode, stderr)
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "demo stopped by SIGTERM" in errors[0] and "stage 2/8" in errors[0], errors[0]
    assert "run the same command again to continue" in errors[0]
    assert not (out / "stages" / "distill.json").exists()  # it stopped there, not later
    assert (out / "stages" / "cache.json").is_file() == (" after stage 2/8" in errors[0])
    teacher_record = (out / "stages" / "teacher.json").stat().st_mtime_ns
    shard = out / "teacher-cache" / "emb-00000.npy"  # written before the stop, when it was reached
    shard_written = shard.stat().st_mtime_ns if shard.is_file() else None

    # the same command again: the finished stages are skipped, the rest runs to the end
    proc = demo_cli(out)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert "[1/8] the self-supervised teacher" in stderr and "done before, skipped" in stderr
    assert (out / "stages" / "teacher.json").stat().st_mtime_ns == teacher_record
    if shard_written is not None:  # the cache went on from its last whole shard
        assert shard.stat().st_mtime_ns == shard_written
    assert "report.md" in stdout

    names = ["teacher", "cache", "distill", "profile", "evaluate", "export", "retrieval", "report"]
    results = {n: json.loads((out / "stages" / f"{n}.json").read_text()) for n in names}
    report = (out / "report" / "report.md").read_text()
    for needle in ("Teacher and student", "student before distillation", "onnxruntime int8", "IDMap2,Flat"):
        assert needle in report
    for picture in ("loss.png", "accuracy_cost.png", "latency.png", "retrieval.png"):
        assert (out / "report" / picture).stat().st_size > 2000, picture
    summary = json.loads((out / "report" / "report.json").read_text())
    assert summary["stages"]["profile"]["ratios"]["flops_ratio"] > 5  # the student is much cheaper
    assert summary["stages"]["export"]["parity"]["fp32"]["min_cosine"] > 0.9999
    assert summary["stages"]["retrieval"]["vectors"] == 256
    assert results["cache"]["images"] == 256

    settings = DemoSettings.quick(**TINY, workers=0, device="cpu")  # what the command line ran
    again = run_demo(out, settings, progress=False)  # every stage is skipped: same numbers
    assert list(again) == names
    assert again["evaluate"] == results["evaluate"]
    with pytest.raises(CompressEdgeError, match="--fresh"):
        run_demo(out, DemoSettings.quick(workers=0), progress=False)

    # the command the run-length warning gives a demo user (the demo has no --epochs) trains the demo's
    # student from the demo's teacher cache
    longer = longer_distill(Demo(out, settings, progress=False)).format(epochs=2)
    assert longer.endswith(" (or the full demo, without --quick)")
    words = shlex.split(longer.removesuffix(" (or the full demo, without --quick)"))
    assert words[:2] == ["compress-edge", "distill"] and words[words.index("--epochs") + 1] == "2"
    run = subprocess.run([sys.executable, "-m", "compress_edge", *words[1:], "--workers", "0", "--device", "cpu",
                          "--no-progress"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    made = json.loads((out / "student-longer" / "student" / "model.json").read_text())
    demo_student = json.loads((out / "student" / "student" / "model.json").read_text())
    for key in ("arch", "arch_kwargs", "embed_dim", "image_size"):
        assert made[key] == demo_student[key], key
    assert json.loads((out / "student-longer" / "config.json").read_text())["plan"]["epochs"] == 2


# -- the stop logic on stand-in stages, in this process, with real signals ----------------------------------
def _record(name: str):
    return lambda demo: {"stage": name}


def _signalled(demo: Demo) -> dict:
    os.kill(os.getpid(), signal.SIGTERM)  # no handler of its own: the demo's stops it at once
    time.sleep(5)
    raise AssertionError("SIGTERM did not stop the stage")


def _takes_the_signal_and_finishes(demo: Demo) -> dict:
    from compress_edge.signals import StopRequest

    # like the teacher cache on its last shard: its own handler takes the signal and the stage finishes
    with StopRequest(then="finishing") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
    return {"stage": "took it"}


def _stops_at_a_safe_point(demo: Demo) -> dict:
    from compress_edge.signals import StopRequest
    from compress_edge.train.engine import TrainingStopped

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == signal.SIGINT
        raise TrainingStopped("stopped at epoch 1, batch 2; checkpoint saved, continue with --resume x")


@pytest.fixture
def _sigterm_fails_the_test():
    """While the test runs, a SIGTERM that the demo does not handle fails it instead of ending pytest."""
    def fallback(signum, frame):
        raise AssertionError("the demo left SIGTERM unhandled")

    old = signal.signal(signal.SIGTERM, fallback)
    yield
    signal.signal(signal.SIGTERM, old)


@pytest.mark.parametrize("middle, words, kept", [
    (_signalled, "demo stopped by SIGTERM during stage 2/3 (middle)", ["one"]),
    (_takes_the_signal_and_finishes, "demo stopped by SIGTERM after stage 2/3 (middle)", ["one", "middle"]),
    (_stops_at_a_safe_point, "demo stopped by SIGINT during stage 2/3 (middle)", ["one"]),
])
def test_a_stop_signal_stops_the_demo_where_it_is(tmp_path, middle, words, kept, _sigterm_fails_the_test):
    stages = [Stage("one", "one", _record("one")), Stage("middle", "middle", middle),
              Stage("last", "last", _record("last"))]
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    demo = Demo(tmp_path / "demo", DemoSettings.quick(), progress=False)
    with pytest.raises(DemoStopped) as stopped:
        demo.run(stages)
    message = str(stopped.value)
    assert words in message and "run the same command again to continue" in message, message
    assert sorted(p.stem for p in (tmp_path / "demo" / "stages").glob("*.json")) == sorted(kept)
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the handlers are given back
    assert signal.set_wakeup_fd(-1) == -1  # and the wakeup fd

    # run again: the finished stages are skipped, the others run
    stages[1] = Stage("middle", "middle", _record("middle"))
    assert Demo(tmp_path / "demo", DemoSettings.quick(), progress=False).run(stages) == {
        "one": {"stage": "one", "seconds": pytest.approx(0, abs=0.5)},
        "middle": {"stage": "took it" if "after" in words else "middle", "seconds": pytest.approx(0, abs=5.5)},
        "last": {"stage": "last", "seconds": pytest.approx(0, abs=0.5)},
    }
