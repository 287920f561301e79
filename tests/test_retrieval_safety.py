"""The index folder is data, not instructions (issue 12, reliability and security findings, retrieval
side): one writer per index folder, stored paths kept inside the gallery, names from data shown as
text, NaN embeddings refused, the sidecar and the model file checked, and the retrieval benchmark's
--workdir. Real FAISS, a real ONNX model, real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from compress_edge.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "stripes")


def cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """compress-edge in its own process: real stdout bytes, a wide terminal, no colours."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(COLUMNS="400", NO_COLOR="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "compress_edge", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def one_line_error(result, *words: str) -> str:
    out = result.output if hasattr(result, "output") else result.stderr
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 1, out
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out
    assert "internal error" not in out and "Traceback" not in out, out
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def export(root: Path, seed: int = 2, size: int = 32) -> Path:
    """A random mobilenet_v3_small (its model folder) and its ONNX export, model.onnx, in ``root``."""
    import torch
    from compress_edge.export.onnx import export_onnx

    from compress_edge.models.resolve import create_model, save_model, spec_for

    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", small_input=True).eval()
    spec = save_model(model, spec_for(model, image_size=size), root / "student")
    onnx = root / "model.onnx"
    export_onnx(model, spec, onnx, exporter="torchscript", simplify=False)
    return onnx


def change_weights(src: Path, dst: Path, how) -> Path:
    """``dst``: ``src`` with its largest float initializer passed through ``how`` (metadata kept)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    init = max((i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT),
               key=lambda i: int(np.prod(i.dims)))
    arr = numpy_helper.to_array(init).copy()
    init.CopyFrom(numpy_helper.from_array(how(arr).astype(np.float32), init.name))
    onnx.save(m, str(dst))
    return dst


@pytest.fixture(scope="module")
def base(tmp_path_factory, make_images):
    root = tmp_path_factory.mktemp("safety")
    gallery = make_images(root / "gallery", classes=CLASSES, per_class=8, size=32)
    onnx = export(root)
    index = root / "index"
    result = runner.invoke(app, ["index", "build", str(onnx), str(gallery), "--out", str(index), "--no-progress"])
    assert result.exit_code == 0, result.output
    return {"root": root, "gallery": gallery, "onnx": onnx, "index": index,
            "query": str(gallery / "circle" / "circle_000.png")}


@pytest.fixture
def index(base, tmp_path):
    """A copy of the built index, this test's to change."""
    dst = tmp_path / "index"
    shutil.copytree(base["index"], dst)
    return dst


def sidecar(index: Path) -> dict:
    return json.loads((index / "index.json").read_text())


def write_sidecar(index: Path, meta: dict) -> None:
    (index / "index.json").write_text(json.dumps(meta))


# -- 1. one writer per index folder ---------------------------------------------------------------------
HOLD = ("import sys, time\n"
        "from compress_edge.storage import folder_lock\n"
        "with folder_lock(sys.argv[1], what='index add'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(300)\n")


def test_a_second_writer_is_refused_naming_the_holder(base, index, tmp_path, make_images):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(index)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (index / "index.json").read_bytes()
        new = make_images(tmp_path / "new", classes=("circle",), per_class=2, size=32, seed=5)
        for args in (["index", "add", str(index), str(new)],
                     ["index", "remove", str(index), "circle/circle_000.png"],
                     ["index", "build", str(base["onnx"]), str(base["gallery"]), "--out", str(index), "--overwrite",
                      "--no-progress"]):
            result = runner.invoke(app, args)
            one_line_error(result, "in use by another process", f"pid {holder.pid}", "index add")
        assert (index / "index.json").read_bytes() == before
        # readers do not lock: search and info work while a writer holds the folder, and .lock is no index file
        found = runner.invoke(app, ["search", str(index), base["query"], "-k", "3", "--json"])
        assert found.exit_code == 0, found.output
        assert json.loads(found.stdout)[0]["neighbours"][0]["file"] == "circle/circle_000.png"
        assert runner.invoke(app, ["index", "info", str(index)]).exit_code == 0
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the lock with its holder: the next writer goes ahead
    result = runner.invoke(app, ["index", "add", str(index), str(new), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ntotal"] == 26
    assert (index / ".lock").is_file() and "v0001" not in os.listdir(index)


def test_two_concurrent_adds_lose_nothing(base, index, tmp_path, make_images):
    folders = [make_images(tmp_path / f"new{i}", classes=("circle", "square"), per_class=3, size=32, seed=20 + i)
               for i in range(2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "compress_edge", "index", "add", str(index), str(f), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for f in folders]
    outs = [(p.communicate(timeout=300), p.returncode) for p in procs]
    added = 0
    for (stdout, stderr), code in outs:
        if code == 0:
            added += json.loads(stdout)["added"]
        else:  # refused while the other one wrote: one line saying so, nothing half-written
            assert code == 1 and "in use by another process" in stderr and "internal error" not in stderr, stderr
    assert added in (6, 12)
    info = runner.invoke(app, ["index", "info", str(index), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["vectors"] == 24 + added
    assert len(sidecar(index)["files"]) == 24 + added


WRITER = ("import sys\n"
          "from compress_edge.retrieval.index import add_images, remove_files\n"
          "index, new, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
          "for _ in range(rounds):\n"
          "    add_images(index, [new])\n"
          "    remove_files(index, sorted(str(p) for p in __import__('pathlib').Path(new).rglob('*.png')))\n"
          "print('done', flush=True)\n")


def test_searches_during_adds_and_removes_see_a_whole_index(base, index, tmp_path, make_images):
    from compress_edge.retrieval.search import Searcher, open_index

    new = make_images(tmp_path / "new", classes=("circle",), per_class=2, size=32, seed=5)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(index), str(new), "4"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with Searcher(index) as searcher:
        x = searcher.embed([base["query"]])
    searches = 0
    try:
        while writer.poll() is None or searches == 0:  # opened afresh each time, as a new process would
            idx = open_index(index)
            _, ids = idx.search(x, 3)
            assert idx.item(int(ids[0, 0]))["file"] == "circle/circle_000.png"
            searches += 1
    finally:
        out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0 and out.strip() == "done", err[-2000:]
    assert searches > 10
    assert json.loads(runner.invoke(app, ["index", "info", str(index), "--json"]).stdout)["vectors"] == 24


# -- 2. stored paths stay inside the gallery ------------------------------------------------------------
def test_paths_outside_the_gallery_are_never_shown_or_opened(base, index, tmp_path):
    outside = base["gallery"].parent / "outside"
    outside.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(outside / "secret.png")
    meta = sidecar(index)
    assert meta["files"][0] == "circle/circle_000.png"  # stored relative to the gallery root
    meta["files"][0] = "../outside/secret.png"
    meta["files"][1] = str(outside / "secret.png")
    meta["files"][2] = "../../../../../../../../etc/passwd"
    meta["files"][3] = "fashion-mnist:../../etc/passwd"
    write_sidecar(index, meta)
    grid = tmp_path / "grid.png"
    run = cli("search", index, base["query"], "-k", "6", "--json", "--grid", grid)
    assert run.returncode == 0, run.stderr
    hits = {h["id"]: h for h in json.loads(run.stdout)[0]["neighbours"]}
    assert {0, 1, 2, 3} <= set(hits)
    assert all(hits[i]["path"] is None for i in (0, 1, 2, 3))
    assert all(h["path"] and Path(h["path"]).is_relative_to(base["gallery"]) for i, h in hits.items() if i > 3)
    assert "outside the gallery" in run.stderr and "secret.png" in run.stderr
    with Image.open(grid) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert not np.all(rgb == (255, 0, 0), axis=-1).any()  # the red image outside was never drawn

    table = cli("search", index, base["query"], "-k", "3")
    assert table.returncode == 0, table.stderr
    assert "(skipped: ../outside/secret.png is outside the gallery)" in table.stdout
    shown = [line for line in table.stdout.splitlines() if "secret.png" in line or "passwd" in line]
    assert shown and all("(skipped: " in line for line in shown)


# -- 3. names from data are text -------------------------------------------------------------------------
def test_names_from_data_are_shown_as_text(base, tmp_path, make_images):
    classes = ("scans[", "]final", "[cls]")
    gallery = make_images(tmp_path / "g", classes=classes, per_class=3, size=32)
    (gallery / "scans[" / "scans[_000.png").rename(gallery / "scans[" / "[bold]report.png")
    (gallery / "]final" / "]final_000.png").rename(gallery / "]final" / "esc\x1b[2Jx.png")
    (gallery / "[cls]" / "[cls]_000.png").rename(gallery / "[cls]" / "t\x1b]0;owned\x07.png")
    index = tmp_path / "idx[/x]"
    built = cli("index", "build", base["onnx"], gallery, "--out", index, "--no-progress")
    assert built.returncode == 0, built.stderr
    assert "idx[/x]" in built.stdout
    queries = [gallery / "scans[" / "[bold]report.png", gallery / "]final" / "esc\x1b[2Jx.png",
               gallery / "[cls]" / "t\x1b]0;owned\x07.png"]
    for command in ("search", "classify"):
        run = cli(command, index, *queries, "-k", "9")
        assert run.returncode == 0, run.stderr
        out = run.stdout
        assert "\x1b" not in out and "\x07" not in out
        for name in classes:
            assert name in out
        assert "[bold]report.png" in out
        assert "esc\\x1b[2Jx.png" in out and "t\\x1b]0;owned\\x07.png" in out
    info = cli("index", "info", index)
    assert info.returncode == 0 and "idx[/x]" in info.stdout


# -- 4. NaN embeddings ---------------------------------------------------------------------------------------
def test_a_model_giving_nan_is_refused_naming_the_file(base, tmp_path):
    nan = change_weights(base["onnx"], tmp_path / "nan.onnx", lambda a: np.full_like(a, np.nan))
    out = tmp_path / "nan-index"
    result = runner.invoke(app, ["index", "build", str(nan), str(base["gallery"]), "--out", str(out), "--no-progress"])
    one_line_error(result, "non-finite", str(nan))
    assert not (out / "index.json").exists()
    for command in ("search", "classify"):
        result = runner.invoke(app, [command, str(base["index"]), base["query"], "--model", str(nan), "--json",
                                     "--trust-model"])
        one_line_error(result, "non-finite", str(nan))


# -- 5. the sidecar and the model are checked -----------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    (lambda m: m.update(files=m["files"][:-3]), ["lists 21 files for 24 ids"]),
    (lambda m: m.update(files=None), ["built from images but lists no files"]),
    (lambda m: m.update(labels=[99] + m["labels"][1:]), ["label 99 is not one of its 3 classes"]),
    (lambda m: m.update(classes=[]), ["labels but no class names"]),
    (lambda m: m.update(ids=m["ids"][::-1]), ["ids are not sorted"]),
    (lambda m: m["index"].update(file="../../elsewhere/index.faiss"), ["not a generation file"]),
    (lambda m: m.update(manifests=["../../x.manifest.json"]), ["manifests are not file names"]),
])
def test_a_damaged_sidecar_is_refused(index, base, change, words):
    meta = sidecar(index)
    change(meta)
    write_sidecar(index, meta)
    for args in (["search", str(index), base["query"], "-k", "300", "--json"],
                 ["classify", str(index), base["query"]], ["index", "info", str(index)]):
        one_line_error(runner.invoke(app, args), "index.json is damaged", *words)


def test_a_missing_embedding_store_is_refused(index, base, tmp_path, make_images):
    shutil.rmtree(index / "embeddings")
    new = make_images(tmp_path / "new", classes=("circle",), per_class=1, size=32, seed=5)
    one_line_error(runner.invoke(app, ["index", "add", str(index), str(new)]), "embedding store", "missing")
    one_line_error(runner.invoke(app, ["search", str(index), base["query"]]), "embedding store", "missing")


def test_a_missing_weights_hash_is_a_mismatch_unless_trusted(index, base):
    meta = sidecar(index)
    meta["spec"]["weights_sha256"] = None
    write_sidecar(index, meta)
    one_line_error(runner.invoke(app, ["search", str(index), base["query"]]), "no weights hash", "--trust-model")
    trusted = runner.invoke(app, ["search", str(index), base["query"], "--trust-model", "--json"])
    assert trusted.exit_code == 0, trusted.output


def test_a_tampered_model_file_is_refused(base, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    onnx = shutil.copy(base["onnx"], folder / "model.onnx")
    index = tmp_path / "index"
    result = runner.invoke(app, ["index", "build", str(onnx), str(base["gallery"]), "--out", str(index),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert sidecar(index)["model_file"]["path"] == str(Path(onnx).resolve())
    change_weights(onnx, onnx, lambda a: a * 1.05)  # still parses, same metadata
    one_line_error(runner.invoke(app, ["search", str(index), base["query"]]), "was changed since", "model.onnx")
    one_line_error(runner.invoke(app, ["classify", str(index), base["query"]]), "was changed since")
    assert runner.invoke(app, ["search", str(index), base["query"], "--trust-model"]).exit_code == 0

    # an exported file is checked against its export.json too, whatever the index was built with
    exported = tmp_path / "export"
    exported.mkdir()
    copy = shutil.copy(base["onnx"], exported / "model.onnx")
    from compress_edge.storage import sha256_file

    (exported / "export.json").write_text(json.dumps({"files": {"model.onnx": {"sha256": sha256_file(copy)}}}))
    ok = runner.invoke(app, ["search", str(base["index"]), base["query"], "--model", str(copy), "--json"])
    assert ok.exit_code == 0, ok.output
    change_weights(copy, copy, lambda a: a * 1.05)
    one_line_error(runner.invoke(app, ["search", str(base["index"]), base["query"], "--model", str(copy)]),
                   "changed since it was exported", "export.json")


# -- 6. the benchmark's --workdir -------------------------------------------------------------------------------
def test_bench_retrieval_creates_its_workdir(tmp_path):
    work = tmp_path / "not" / "yet"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bench = [sys.executable, str(REPO / "benchmarks" / "bench_retrieval.py")]
    run = subprocess.run([*bench, "--workdir", str(work), "--datasets", "clustered", "--n", "300", "--queries", "20",
                          "--budgets", "auto"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert work.is_dir() and "clustered" in run.stdout
    file = tmp_path / "a-file"
    file.write_text("x")
    run = subprocess.run([*bench, "--workdir", str(file)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and "is a file, not a folder" in run.stderr and "Traceback" not in run.stderr


# -- 7. a full disk ---------------------------------------------------------------------------------------------
DISK_FULL = r"""
import json, os, subprocess, sys
mnt, steps = sys.argv[1], json.loads(sys.argv[2])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt], check=True)
out = []
for step in steps:
    if step[0] == "leave":  # fill the disk up to this many free bytes
        st = os.statvfs(mnt)
        with open(os.path.join(mnt, "filler"), "ab") as fh:
            fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - int(step[1])))
        continue
    r = subprocess.run([sys.executable, "-m", "compress_edge", *step], capture_output=True, text=True)
    files = sorted(os.path.relpath(os.path.join(d, f), mnt) for d, _, fs in os.walk(mnt) for f in fs)
    out.append({"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "files": files})
print(json.dumps(out))
"""


def _private_mounts() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(sys.platform != "linux" or not _private_mounts(), reason="needs unshare and tmpfs mounts")
def test_a_full_disk_gives_one_message_and_leaves_no_leftovers(base, tmp_path, make_images):
    disk = tmp_path / "disk"
    disk.mkdir()
    new = make_images(tmp_path / "new", classes=("circle",), per_class=8, size=32, seed=5)
    idx, idx2 = str(disk / "idx"), str(disk / "idx2")
    steps = [
        ["index", "build", str(base["onnx"]), str(base["gallery"]), "--out", idx, "--no-progress"],
        ["leave", 120_000],
        ["index", "add", idx, str(new)],  # its shards fit, the new index generation does not
        ["index", "info", idx, "--json"],
        ["index", "build", str(base["onnx"]), str(base["gallery"]), "--out", idx2, "--no-progress"],
        ["leave", 20_000],
        ["index", "add", idx, str(new)],  # not even the shards fit
        ["search", idx, base["query"], "--json"],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["unshare", "-rm", sys.executable, "-c", DISK_FULL, str(disk), json.dumps(steps)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    built, add, info, build2, add2, search = json.loads(run.stdout)
    assert built["rc"] == 0, built["stderr"]
    def idx_files(result: dict) -> list[str]:
        return sorted(f for f in result["files"] if f.startswith("idx/"))

    before = idx_files(built)
    for result in (add, build2, add2):
        line = one_line_error(subprocess.CompletedProcess([], result["rc"], result["stdout"], result["stderr"]), "no space left on the disk of", "free some space")
        assert "needs about" in line
    assert idx_files(add) == before  # no v0002/, no unused shards
    assert info["rc"] == 0 and json.loads(info["stdout"])["vectors"] == 24
    assert [f for f in build2["files"] if f.startswith("idx2/")] == []  # the folder it made is gone again
    assert idx_files(add2) == before
    assert search["rc"] == 0 and json.loads(search["stdout"])[0]["neighbours"]


# -- 8. an interrupted index remove ---------------------------------------------------------------------------
# `compress-edge index remove` in a real process whose audit hook counts the writes it makes in the index
# folder (files opened for writing, renames, folders made and removed). At write N it records which one in
# a marker file and waits there: the test polls for the marker, then sends the signal. Without N it only
# lists the writes, so every write the remove makes, whatever they are, is a point to interrupt at.
PAUSE_AT_WRITE = r"""
import os, re, runpy, sys, time
folder, at, marker = os.path.realpath(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
WRITES = {"open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.chmod", "os.truncate"}
seen = []
def hook(event, args):
    if event not in WRITES or not args or args[0] is None or isinstance(args[0], int):
        return
    path = os.path.realpath(os.path.abspath(os.fsdecode(args[0])))
    if os.path.commonpath([path, folder]) != folder:
        return
    if event == "open" and not (args[2] & (os.O_WRONLY | os.O_RDWR)) and str(args[1] or "r").strip("bt") == "r":
        return
    names = [os.path.relpath(os.path.realpath(os.path.abspath(os.fsdecode(a))), folder)
             for a in (args[:2] if event == "os.rename" else args[:1])]
    # a temporary file's random part (tempfile.mkstemp) left out, so that two runs list the same writes
    seen.append(" ".join([event, *(re.sub(r"\.[a-z0-9_]{8}(\.[^/]*)?\.tmp$", r".*\1.tmp", n) for n in names)]))
    if at == 0:
        with open(marker, "a") as fh:
            fh.write(seen[-1] + "\n")
    elif len(seen) == at:
        with open(marker + ".tmp", "w") as fh:
            fh.write(seen[-1])
        os.replace(marker + ".tmp", marker)
        time.sleep(120)  # parked: the test signals this process now
sys.addaudithook(hook)
sys.argv = ["compress-edge", *sys.argv[4:]]
runpy.run_module("compress_edge", run_name="__main__")
"""
GONE = ("circle/circle_000.png", "square/square_003.png")


def start_remove(index: Path, at: int, marker: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(COLUMNS="400", NO_COLOR="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", PAUSE_AT_WRITE, str(index), str(at), str(marker), "index",
                             "remove", str(index), *GONE, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 120) -> str:
    import time

    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"ended before the write it should stop at: {proc.communicate()}"
        assert time.monotonic() < deadline, "never reached the write"
        time.sleep(0.02)
    return marker.read_text()


def writes_of_a_remove(base, tmp_path) -> list[str]:
    """The writes one uninterrupted remove makes in the index folder, in order."""
    index = tmp_path / "traced"
    shutil.copytree(base["index"], index)
    log = tmp_path / "writes.txt"
    proc = start_remove(index, 0, log)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "removed 2 images; the index holds 22" in out, err
    writes = log.read_text().splitlines()
    assert any(w.startswith("os.rename") and w.endswith("index.json") for w in writes), writes
    return writes


def content(base, index: Path) -> str:
    """"old" or "new": what ``index info`` and ``search`` show, each checked against the other."""
    info = runner.invoke(app, ["index", "info", str(index), "--json"])
    assert info.exit_code == 0, info.output
    vectors = json.loads(info.stdout)["vectors"]
    assert vectors in (24, 22), vectors
    found = runner.invoke(app, ["search", str(index), str(base["gallery"] / GONE[0]), "-k", "24", "--json"])
    assert found.exit_code == 0, found.output
    files = [h["file"] for h in json.loads(found.stdout)[0]["neighbours"]]
    assert len(files) == vectors and len(set(files)) == vectors
    if vectors == 24:
        assert files[0] == GONE[0] and GONE[1] in files
        return "old"
    assert not set(GONE) & set(files)
    return "new"


def finish(base, index: Path) -> None:
    """The same remove run again (--missing-ok: it may have been done) ends with the new content."""
    again = runner.invoke(app, ["index", "remove", str(index), *GONE, "--missing-ok", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["ntotal"] == 22
    info = runner.invoke(app, ["index", "info", str(index), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["vectors"] == 22, info.output


def kill_at(base, tmp_path, writes: list[str], points: list[int], sig: int = signal.SIGKILL) -> dict[int, tuple]:
    """One remove per point, each on its own copy of the index, all started at once; each gets ``sig``
    (to its process group) at its write. Returns {point: (index folder, returncode, stdout, stderr)}."""
    runs = []
    for n in points:
        index = tmp_path / f"idx{n}"
        shutil.copytree(base["index"], index)
        runs.append((n, index, tmp_path / f"at{n}", start_remove(index, n, tmp_path / f"at{n}")))
    done = {}
    try:
        for n, index, marker, proc in runs:
            assert wait_for(marker, proc) == writes[n - 1]
            os.killpg(proc.pid, sig)
            out, err = proc.communicate(timeout=120)
            done[n] = (index, proc.returncode, out, err)
    finally:
        for *_, proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def test_a_remove_killed_at_any_write_leaves_a_whole_index(base, tmp_path):
    """kill -9 at each write ``index remove`` makes: every later info and search works and shows the
    content from before the remove or from after it, never a mix; the same remove again finishes it."""
    writes = writes_of_a_remove(base, tmp_path)
    first = writes.index("open .lock") + 2  # up to the lock file nothing of the index changes
    commit = next(i for i, w in enumerate(writes, 1) if w.startswith("os.rename") and w.endswith(" index.json"))
    for n, (index, code, _, _) in kill_at(base, tmp_path, writes, list(range(first, len(writes) + 1))).items():
        assert code == -signal.SIGKILL
        # up to the sidecar's rename (the commit point) the old index, from then on the new one
        assert content(base, index) == ("old" if n <= commit else "new"), (n, writes[n - 1])
        finish(base, index)


def test_a_remove_stopped_by_sigterm_ends_cleanly(base, tmp_path):
    """SIGTERM to the process group of ``index remove`` (as a scheduler or ``docker stop`` sends it) while
    it writes: one error line and no traceback (or the remove finished), and a whole index."""
    writes = writes_of_a_remove(base, tmp_path)
    commit = next(i for i, w in enumerate(writes, 1) if w.startswith("os.rename") and w.endswith(" index.json"))
    faiss_file = next(i for i, w in enumerate(writes, 1) if w.startswith("os.rename") and w.endswith("index.faiss"))
    points = [writes.index("open .lock") + 2, faiss_file, commit, commit + 1]
    for n, (index, code, out, err) in kill_at(base, tmp_path, writes, points, signal.SIGTERM).items():
        assert "Traceback" not in err and "internal error" not in err, err
        if code == 0:
            assert "removed 2 images" in out
        else:
            assert code == 1, (n, writes[n - 1], code, err)
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "SIGTERM" in errors[0], err
        assert content(base, index) == ("old" if n <= commit else "new"), (n, writes[n - 1])
        finish(base, index)


def test_the_next_writer_drops_what_a_killed_remove_left(base, tmp_path):
    """After kill -9 just before and just after the sidecar's rename, the same remove run again leaves the
    folder as a remove that was never interrupted does: one generation, no temporary file."""
    writes = writes_of_a_remove(base, tmp_path)
    commit = next(i for i, w in enumerate(writes, 1) if w.startswith("os.rename") and w.endswith(" index.json"))
    for n, (index, _, _, _) in kill_at(base, tmp_path, writes, [commit, commit + 1]).items():
        finish(base, index)
        generations = [p.name for p in index.iterdir() if p.is_dir() and p.name != "embeddings"]
        assert len(generations) == 1, (writes[n - 1], generations)
        assert sorted(p.name for p in index.iterdir() if p.is_file()) == [".lock", "index.json"], writes[n - 1]
        assert sorted(p.name for p in (index / generations[0]).iterdir()) == ["index.faiss"], writes[n - 1]
