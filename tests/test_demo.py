"""The main job end to end, at a size smaller than --quick: every stage runs, the report is written,
a second run skips every stage, and a folder made with other settings is refused."""

from __future__ import annotations

import json

import pytest

from compress_edge.demo import DemoSettings, run_demo
from compress_edge.errors import CompressEdgeError


@pytest.mark.slow
def test_demo_runs_every_stage_and_resumes(tmp_path):
    settings = DemoSettings.quick(train_data="fashion-mnist:train@256", test_data="fashion-mnist:test@64",
                                  teacher_epochs=1, teacher_batch=64, distill_epochs=1, distill_batch=64,
                                  queue_size=128, calib_images=16, search_queries=2, workers=0, device="cpu")
    out = tmp_path / "demo"
    results = run_demo(out, settings, progress=False)
    assert list(results) == ["teacher", "cache", "distill", "profile", "evaluate", "export", "retrieval", "report"]
    report = (out / "report" / "report.md").read_text()
    for needle in ("Teacher and student", "student before distillation", "onnxruntime int8", "IDMap2,Flat"):
        assert needle in report
    for picture in ("loss.png", "accuracy_cost.png", "latency.png", "retrieval.png"):
        assert (out / "report" / picture).stat().st_size > 2000, picture
    summary = json.loads((out / "report" / "report.json").read_text())
    assert summary["stages"]["profile"]["ratios"]["flops_ratio"] > 5  # the student is much cheaper
    assert summary["stages"]["export"]["parity"]["fp32"]["min_cosine"] > 0.9999
    assert summary["stages"]["retrieval"]["vectors"] == 256

    again = run_demo(out, settings, progress=False)  # every stage is skipped: same numbers
    assert again["evaluate"] == results["evaluate"]
    with pytest.raises(CompressEdgeError, match="--fresh"):
        run_demo(out, DemoSettings.quick(workers=0), progress=False)
