"""`steindreamer batch`: the ledger, isolation of bad items, resume after SIGKILL, --retry-failed and
the gallery, end to end on the tiny random pipeline (each item is a real `generate` subprocess)."""
import contextlib
import html
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import steindreamer
from steindreamer import batch

# Tiny settings (as FAST in test_cli.py) plus an explicit engine, so a change of the default preset
# (e.g. to SSD with a depth model) does not change what these tests exercise.
FAST = ["engine=sds", "resolution=16", "render.samples=16", "field.grid.levels=4", "field.grid.log2_table=12",
        "field.grid.max_res=64", "train.val_every=2", "train.ckpt_every=2", "train.val_views=2", "train.variance_every=0",
        "mesh.enabled=false", "mesh.grid_resolution=32", "export.texture_size=32", "export.turntable=false"]
BUILTIN = Path(steindreamer.__file__).parent / "builtin" / "diffusion" / "model_index.json"


def run_batch(*argv) -> int:
    """`steindreamer batch ...` in-process, through the CLI once `batch` is wired in."""
    from steindreamer import cli

    argv = [str(a) for a in argv]
    return cli.main(["batch", *argv]) if "batch" in cli.COMMANDS else batch.run_cli(argv)


def batch_command() -> list[str]:
    from steindreamer import cli

    return [sys.executable, "-m", "steindreamer", "batch"] if "batch" in cli.COMMANDS else [sys.executable, "-m", "steindreamer.batch"]


def ledger_rows(folder: Path) -> dict:
    with contextlib.closing(sqlite3.connect(f"file:{folder / 'ledger.sqlite'}?mode=ro", uri=True, timeout=30)) as db:
        db.row_factory = sqlite3.Row
        return {r["prompt"]: dict(r) for r in db.execute("SELECT * FROM items")}


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("# a batch for the tests\n" + "".join(json.dumps(i) + "\n" for i in items))
    return path


def mtimes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:  # Linux; elsewhere this check is skipped
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
    return found


# --- one scenario, several checks --------------------------------------------------------------
# A batch of 4 (5 with the built-in model): started in a subprocess, SIGKILLed once the first item
# is done and the second has a checkpoint, then run again in-process to the end.

@pytest.fixture(scope="module")
def scenario(tiny_latent_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    items = [
        {"prompt": "a red cube"},  # done before the kill
        {"prompt": "a blue ball", "seed": 3, "overrides": {"steps": 6}},  # killed half-way, then resumed
        {"prompt": "a broken thing", "overrides": {"model": "/nonexistent/model"}},  # fails alone
        # with a (tiny) turntable, the gallery's first choice of picture
        {"prompt": "a green cone", "overrides": {"export.turntable": True, "export.turntable_frames": 4, "export.turntable_size": 16}},
    ]
    if BUILTIN.exists():  # a word the built-in model does not know: a failed item, not a failed batch
        items.append({"prompt": "a zorblax", "overrides": {"model": "builtin"}})
    prompts = write_jsonl(root / "prompts.jsonl", items)
    out = root / "out"
    args = [prompts, "--out", out, f"model={tiny_latent_model}", *FAST, "steps=2"]
    rec = {"root": root, "out": out, "prompts": prompts, "items": items, "args": args}

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEINDREAMER_CACHE", str(root / "cache"))
        log = open(root / "first.log", "wb")
        proc = subprocess.Popen([*batch_command(), *map(str, args)], stdout=log, stderr=subprocess.STDOUT)
        ball = out / "runs" / "a-blue-ball-3"
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, f"batch ended early ({proc.returncode}): {(root / 'first.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "first item never finished: " + (root / "first.log").read_text()[-2000:]
            with contextlib.suppress(sqlite3.Error, OSError, KeyError):
                if ledger_rows(out)["a red cube"]["status"] == "done" and list((ball / "checkpoints").glob("step_*.pt")):
                    break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        # The child training the ball must die with its driver (no orphan writing into the run folder);
        # only then is the run folder's state final.
        deadline = time.monotonic() + 20
        while processes_mentioning(str(ball)) and time.monotonic() < deadline:
            time.sleep(0.1)
        rec["orphans"] = processes_mentioning(str(ball))
        rec["killed_rows"] = ledger_rows(out)
        ckpts = sorted((ball / "checkpoints").glob("step_*.pt"))
        rec["killed_ckpt"] = {"name": ckpts[-1].name, "step": int(ckpts[-1].stem.split("_")[1]), "mtime": ckpts[-1].stat().st_mtime_ns}
        rec["cube_files"] = mtimes(out / "runs" / "a-red-cube-0")
        rec["cube_result"] = (out / "runs" / "a-red-cube-0" / "result.json").read_text()
        with contextlib.closing(sqlite3.connect(out / "ledger.sqlite")) as db:
            rec["integrity"] = db.execute("PRAGMA integrity_check").fetchone()[0]

        t0 = time.perf_counter()
        rec["rc"] = run_batch(*args, "--quiet")
        rec["second_seconds"] = time.perf_counter() - t0
    rec["rows"] = ledger_rows(out)
    return rec


def test_sigkill_then_rerun_skips_done_and_resumes_interrupted(scenario):
    killed, rows, ck = scenario["killed_rows"], scenario["rows"], scenario["killed_ckpt"]
    assert scenario["integrity"] == "ok"
    assert killed["a red cube"]["status"] == "done" and killed["a blue ball"]["status"] == "running"
    assert scenario["orphans"] == [], "the interrupted item's generate process outlived the killed batch"
    cube, ball = rows["a red cube"], rows["a blue ball"]
    # The finished item is not run again: same attempt, untouched files and result.
    assert cube["attempts"] == 1 and cube["status"] == "done"
    assert mtimes(scenario["out"] / "runs" / "a-red-cube-0") == scenario["cube_files"]
    assert (scenario["out"] / "runs" / "a-red-cube-0" / "result.json").read_text() == scenario["cube_result"]
    # The interrupted item resumed from the checkpoint it had when the batch died.
    assert ball["status"] == "done" and ball["attempts"] == 2 and ball["resumed_from"] == ck["step"] > 0
    run = scenario["out"] / "runs" / "a-blue-ball-3"
    assert (run / "checkpoints" / ck["name"]).stat().st_mtime_ns == ck["mtime"]  # read, never rewritten
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "result.json").read_text())["steps"] == 6


def test_bad_items_fail_alone_with_their_one_line_reason(scenario):
    rows = scenario["rows"]
    assert scenario["rc"] == 1
    assert len(rows) == len(scenario["items"])
    assert {p: r["status"] for p, r in rows.items() if r["status"] == "done"}.keys() == {"a red cube", "a blue ball", "a green cone"}
    broken = rows["a broken thing"]
    assert broken["status"] == "failed" and broken["attempts"] == 1
    assert broken["error"].startswith("error: model folder not found") and "\n" not in broken["error"]
    if BUILTIN.exists():
        assert rows["a zorblax"]["status"] == "failed" and "zorblax" in rows["a zorblax"]["error"]
    for r in rows.values():
        assert r["started_at"] and r["ended_at"] and r["seconds"] > 0 and r["run_dir"].startswith("runs/")
        assert (r["error"] is None) == (r["status"] == "done")


def test_summary_and_gallery_list_every_item(scenario):
    out = scenario["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert [i["prompt"] for i in summary["items"]] == [i["prompt"] for i in scenario["items"]]  # file order
    assert summary["counts"]["done"] == 3 and summary["counts"]["failed"] == len(scenario["items"]) - 3 and not summary["active"]
    for item in summary["items"]:
        if item["status"] == "done":
            if item["prompt"] == "a green cone":  # turntable first, its contact sheet as the still
                assert re.fullmatch(r"runs/a-green-cone-0/turntable\.(mp4|gif)", item["picture"])
                assert item["still"] == "runs/a-green-cone-0/renders/contact_sheet.png"
            else:  # no turntable: the newest validation grid
                assert item["picture"] == f"{item['run_dir']}/renders/val_{item['steps']:07d}.png"
            assert (out / item["picture"]).is_file() and (out / item["still"]).is_file()
            assert set(item["models"]) == {"model.glb", "mesh.obj"} and all((out / m).is_file() for m in item["models"].values())
            assert set(item["metrics"]) >= {"loss"} and item["steps"] in (2, 6)
        else:
            assert item["error"].startswith("error:") and item["picture"] is None
        assert (out / item["log"]).is_file()
    page = (out / "index.html").read_text()
    for item in scenario["items"]:
        assert html.escape(item["prompt"]) in page
    assert page.count('<figure class="item') == len(scenario["items"])


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_gallery_renders_in_headless_chromium(scenario, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium: apt-get install -y chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    url = (scenario["out"] / "index.html").as_uri()
    try:
        proc = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"chromium cannot start here: {err}")
    if proc.returncode != 0 or "<html" not in proc.stdout:
        pytest.skip(f"chromium cannot start here: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    dom = proc.stdout
    figures = re.findall(r'<figure class="([^"]*)" id="item-\d+" data-status="(\w+)"', dom)
    assert len(figures) == len(scenario["items"])
    assert [s for _, s in figures].count("done") == 3
    # Every picture loaded: a broken <img> marks its card "broken" (the page's onerror handler).
    assert not [c for c, _ in figures if "broken" in c.split()]
    assert dom.count("<img ") + dom.count("<video ") == 3
    assert 'href="runs/a-red-cube-0/model.glb"' in dom
    for item in scenario["items"]:
        assert html.escape(item["prompt"]) in dom
    assert "error: model folder not found" in dom


def test_retry_failed_only_when_asked(scenario, tmp_path):
    # A copy of the finished batch folder: its paths are relative, so it works where it lands.
    out = tmp_path / "moved"
    shutil.copytree(scenario["out"], out)
    before = ledger_rows(out)
    args = [a if a != scenario["out"] else out for a in scenario["args"]]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEINDREAMER_CACHE", str(scenario["root"] / "cache"))
        assert run_batch(*args, "--quiet") == 1  # failed items are left alone without --retry-failed
        assert ledger_rows(out) == before
        # Fix the bad line (drop its missing model) and retry: only that item runs.
        fixed = [{"prompt": i["prompt"], **({} if i["prompt"] == "a broken thing" else {k: v for k, v in i.items() if k != "prompt"})}
                 for i in scenario["items"] if i["prompt"] != "a zorblax"]
        prompts = write_jsonl(tmp_path / "prompts.jsonl", fixed)
        assert run_batch(prompts, *args[1:], "--retry-failed", "--quiet") == 0
    after = ledger_rows(out)
    assert after["a broken thing"]["status"] == "done" and after["a broken thing"]["attempts"] == 2
    assert after["a broken thing"]["error"] is None
    for prompt in ("a red cube", "a blue ball", "a green cone"):
        assert after[prompt] == before[prompt]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == 4


# --- fast checks: no generate runs ---------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (None, "prompts file not found"),
    ("# only a comment\n\n", "has no prompts"),
    ('{"prompt": "a cube"}\n\n{"prompt": "a ball",}\n', "line 3: not valid JSON"),
    ('{"prompt": "a cube"}\n["a ball"]\n', "line 2: expected a JSON object"),
    ('{"prompt": "a cube", "colour": "red"}\n', "line 1: unknown key 'colour'"),
    ('{"prompt": "  "}\n', "line 1: the prompt is empty"),
    ('{"prompt": "a cube", "seed": "one"}\n', "line 1: 'seed' must be a non-negative integer"),
    ('{"prompt": "a cube"}\n{"prompt": "a ball", "overrides": {"no.such.key": 1}}\n', "line 2: invalid config"),
    ('{"prompt": "a cube"}\n{"prompt": "a ball", "overrides": {"steps": -1}}\n', "line 2: invalid config: train.steps"),
    ('{"prompt": "a cube", "overrides": "steps=3"}\n', "line 1: 'overrides' must be"),
    ('{"prompt": "a cube", "seed": 2}\n{"prompt": "a cube", "overrides": {"seed": 2}}\n', "line 2: same prompt and seed as line 1"),
    ("a cube\na ball\x07\n", "line 2: the prompt contains control characters"),
])
def test_bad_prompts_file_is_one_line_and_status_2(content, message, tmp_path, capsys):
    prompts = tmp_path / ("prompts.jsonl" if content and content.startswith("{") else "prompts.txt")
    if content is not None:
        prompts.write_text(content)
    assert run_batch(prompts, "--out", tmp_path / "b") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "b").exists()  # bad input leaves nothing behind


@pytest.mark.parametrize("extra, message", [
    (["--preset", "nope"], "unknown preset"),
    (["--config", "/nonexistent/x.yaml"], "config file not found"),
    (["--preset", "toy", "--config", "x.yaml"], "not allowed with argument"),
    (["steps=-2"], "train.steps"),
    (["--ray-address", "127.0.0.1:6379"], "--ray-address needs --executor ray"),
    (["--executor", "dask"], "invalid choice"),
])
def test_bad_batch_arguments(extra, message, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cube\n")
    assert run_batch(prompts, "--out", tmp_path / "b", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


def test_missing_ray_is_a_one_line_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cube\n")
    assert run_batch(prompts, "--out", tmp_path / "b", "--executor", "ray") == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'steindreamer[ray]'" in err and "\n" not in err


def test_a_second_driver_on_the_same_folder_is_refused(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cube\n")
    with batch.BatchLock(tmp_path / "b"):
        assert run_batch(prompts, "--out", tmp_path / "b", "--preset", "toy") == 2
    assert "in use by another batch" in capsys.readouterr().err


def test_text_prompts_seeds_slugs_and_child_command(tmp_path):
    from steindreamer.cli import build_parser

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\n\na red cube\n  A red cube!  \n-a prompt with a dash\n")
    items = batch.read_prompts(prompts, None, None, ["seed=5"])
    assert [(i.prompt, i.seed, i.line) for i in items] == [("a red cube", 5, 3), ("A red cube!", 5, 4), ("-a prompt with a dash", 5, 5)]
    with batch.Ledger(tmp_path / "b" / "ledger.sqlite") as ledger:
        ledger.sync(items)
        ledger.sync(items)  # idempotent: a re-run adds nothing
        rows = ledger.rows()
        assert [r["run_dir"] for r in rows] == ["runs/a-red-cube-5", "runs/a-red-cube-5-2", "runs/a-prompt-with-a-dash-5"]
        assert all(r["status"] == "pending" and r["attempts"] == 0 for r in rows)
        settings = {"prompts_file": str(prompts), "source": ["--preset", "steindreamer"], "overrides": ["seed=5"]}
        runner = batch.Runner(tmp_path / "b", ledger, items, settings, None, False, True)
        job = runner.job(items[2], rows[2])
    # The child's command line parses back to the same prompt and overrides (even with a leading dash).
    args, extra = build_parser().parse_known_args(job.cmd[3:])
    assert (args.command, args.prompt, args.resume, args.quiet, args.preset) == ("generate", "-a prompt with a dash", True, True, "steindreamer")
    assert args.overrides == ["seed=5"] and not extra and Path(args.out) == (tmp_path / "b" / "runs" / "a-prompt-with-a-dash-5").resolve()


def test_failure_line_picks_the_one_line_reason(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("old attempt\nerror: old reason\n")
    offset = log.stat().st_size
    with open(log, "a") as f:
        f.write("UserWarning: something\nerror: model folder not found: /x\n\n")
    assert batch.failure_line(log, offset, 2) == "error: model folder not found: /x"
    offset = log.stat().st_size
    with open(log, "a") as f:
        f.write("Traceback (most recent call last):\n  File ...\nRuntimeError: boom\n")
    assert batch.failure_line(log, offset, 1) == "RuntimeError: boom"
    assert batch.failure_line(log, log.stat().st_size, -9) == "killed by SIGKILL"
    assert batch.failure_line(log, log.stat().st_size, 3) == "exit status 3"


def test_local_executor_runs_one_child_per_visible_gpu(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # slots map to the devices the caller made visible
    script = ("import os, sys; print('on', os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
              "if sys.argv[1] == 'bad': sys.exit('error: bad item')")  # like generate: one line on stderr, non-zero exit
    jobs = [batch.Job((f"p{i}", 0), f"p{i}", 0, tmp_path / f"run{i}", tmp_path / "logs" / f"p{i}.log",
                      [sys.executable, "-c", script, "bad" if i == 1 else "ok"], 1) for i in range(3)]
    ex = batch.LocalExecutor()
    assert ex.capacity == 2
    assert [ex.submit(jobs[0]), ex.submit(jobs[1])] == ["gpu 4", "gpu 6"] and ex.free() == 0
    results, third = {}, None
    deadline = time.monotonic() + 60
    while len(results) < 3 and time.monotonic() < deadline:
        for job, result in ex.wait(0.2):
            results[job.prompt] = result
        if third is None and ex.free():
            third = ex.submit(jobs[2])  # the freed slot takes the next item
    assert results["p0"]["returncode"] == 0 and results["p0"]["error"] is None
    assert results["p1"]["returncode"] == 1 and results["p1"]["error"] == "error: bad item"
    assert results["p2"]["returncode"] == 0
    lines = [[ln for ln in j.log.read_text().splitlines() if ln.startswith("on ")] for j in jobs]
    assert lines[:2] == [["on 4"], ["on 6"]] and lines[2] in (["on 4"], ["on 6"]) and third == f"gpu {lines[2][0][3:]}"
