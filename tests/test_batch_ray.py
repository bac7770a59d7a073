"""`steindreamer batch --executor ray` on a local Ray instance: one task per item, the ledger written by
the driver only, one failing item recorded as failed while the other finishes."""
import json

import pytest

from test_batch import FAST, ledger_rows, run_batch, write_jsonl

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'steindreamer[ray]'); the ray executor is not tested")


@pytest.fixture
def local_ray():
    # The batch reuses a Ray instance its caller started (and leaves it running).
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_executor_runs_the_batch_and_isolates_a_failure(tiny_latent_model, tmp_path, local_ray):
    items = [{"prompt": "a red cube"}, {"prompt": "a broken thing", "overrides": {"model": "/nonexistent/model"}}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", items)
    out = tmp_path / "out"
    args = [prompts, "--out", out, "--executor", "ray", f"model={tiny_latent_model}", *FAST, "steps=2", "--quiet"]
    assert run_batch(*args) == 1
    rows = ledger_rows(out)
    assert rows["a red cube"]["status"] == "done" and rows["a red cube"]["worker"].startswith("ray ")
    assert rows["a broken thing"]["status"] == "failed" and rows["a broken thing"]["error"].startswith("error: model folder not found")
    run = out / rows["a red cube"]["run_dir"]
    assert json.loads((run / "result.json").read_text())["steps"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert [i["status"] for i in summary["items"]] == ["done", "failed"] and summary["items"][0]["picture"]
    # Re-running submits nothing new: done is done, failed waits for --retry-failed.
    assert run_batch(*args) == 1
    assert {p: r["attempts"] for p, r in ledger_rows(out).items()} == {"a red cube": 1, "a broken thing": 1}
