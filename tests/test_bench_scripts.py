"""The benchmark scripts run end to end (tiny sizes) and write the JSON their issues name."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from steindreamer.toy.model import DIFFUSION_DIR

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (DIFFUSION_DIR / "model_index.json").exists(), reason="built-in model not shipped")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steps_to_reach_needs_the_level_held_to_the_end():
    bench = _load("bench_engines")
    series = [{"step": s, "volumetric_iou": q} for s, q in [(0, 0.2), (10, 0.8), (20, 0.3), (30, 0.7), (40, 0.75)]]
    # Running means of two checks: 0.2, 0.5, 0.55, 0.5, 0.725 -> at or above 0.5 from step 10 on.
    assert bench.steps_to_reach(series, 0.5) == 10
    assert bench.steps_to_reach(series, 0.7) == 40
    assert bench.steps_to_reach(series, 0.9) is None
    assert bench.final_quality(series) == pytest.approx(0.725)


def test_bench_step_timings_and_ratios_on_known_times():
    bench = _load("bench_step")
    clock = bench.Clock(torch.device("cpu"))
    clock.times = {"step": [10.0, 2.0, 4.0, 6.0], "unet_cfg": [5.0, 1.0, 1.0, 2.0], "render": [9.0, 1.0, 2.0, 3.0]}
    t = bench.timings(clock, warmup=1)  # the first (warm-up) entry of each is dropped
    assert (t["step_seconds"], t["unet_cfg_seconds"], t["step_over_unet"]) == (4.0, 1.0, 4.0)
    assert t["step_over_unet_paired"] == 3.0  # median of 2/1, 4/1, 6/2: not the ratio of medians
    assert t["breakdown"] == {"unet_cfg": 1.0, "render": 2.0}
    engines = {"sds": {"step_seconds": 2.0, "step_over_unet_paired": 1.5}, "ssd": {"step_seconds": 3.0, "step_over_unet_paired": 2.0}}
    assert bench.step_time_ratios(engines) == pytest.approx({"step_time_ratio_ssd_sds": 1.5, "step_time_ratio_ssd_sds_paired": 4 / 3})
    assert bench.step_time_ratios({"sds": engines["sds"]}) == {}


def test_bench_engines_variance_per_cost_is_variance_times_seconds_over_sds():
    from steindreamer.guidance.variance import StepSamples

    bench = _load("bench_engines")
    gen = torch.Generator().manual_seed(0)

    def samples(scale):
        s = StepSamples()
        for _ in range(30):
            s.add(scale * torch.randn(400, generator=gen))
        return s

    def measure(window_scale, single_scale):
        return {"samples": samples(window_scale), "single": samples(single_scale), "window": 4}

    measures = {"sds": {10: measure(1.0, 1.0), 20: measure(1.0, 1.0)},
                "half": {10: measure(2 ** -0.5, 1.0), 20: measure(2 ** -0.5, 1.0)}}
    timing = {"sds": {"seconds": 1.0, "unet_rows": 4}, "half": {"seconds": 1.5, "unet_rows": 8}}
    cost = bench.per_cost(measures, timing, SimpleNamespace(seed=0))
    assert cost["sds"]["ratio"] == pytest.approx(1.0)
    half = cost["half"]  # half the variance at 1.5x the seconds: 0.75 per cost, 1.0 per UNet call
    assert half["variance_ratio"] == pytest.approx(0.5, rel=0.15) and half["ratio"] == pytest.approx(0.75, rel=0.15)
    assert half["interval"][0] < half["ratio"] < half["interval"][1] and half["per_unet_call"] == pytest.approx(1.0, rel=0.15)
    assert half["single_step_variance_ratio"] == pytest.approx(1.0, rel=0.15)  # one step alone: no gain, reported apart
    assert half["variance_by_step"]["10"] == pytest.approx(4 * 0.5, rel=0.2)  # L x the variance of an L-step mean


def test_bench_convergence_reads_fractions_off_seed_means_and_refuses_a_reuse_that_does_not_reproduce(tmp_path, monkeypatch):
    bench = _load("bench_convergence")
    calls = []

    def fake_series(engine, extra, prompt, args, seed):
        calls.append((tuple(extra), seed))
        fast = "x=1" in extra  # reaches 0.8 by half the steps; SDS only at the end
        steps = range(0, args.steps + 1, args.eval_every)
        iou = [min(0.8, 0.8 * s / (args.steps / 2)) if fast else 0.8 * s / args.steps for s in steps]
        iou = [q + 0.01 * seed for q in iou]  # seeds differ; their mean is what counts
        return {"series": [{"step": s, "volumetric_iou": q} for s, q in zip(steps, iou)], "step_seconds": 0.1}

    monkeypatch.setattr(bench, "train_series", fake_series)
    out = tmp_path / "conv.json"
    argv = ["bench_convergence.py", "--config", "fast=sds:x=1", "--prompts", "p", "--seeds", "2", "--steps", "100",
            "--eval-every", "10", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert bench.main() == 0
    res = json.loads(out.read_text())["prompts"]["p"]
    # SDS final = mean of its last two checks, 0.76 (+0.005 for the seeds' mean); `fast`'s two-check
    # running mean first holds above that at step 60.
    assert res["sds_final_iou"] == pytest.approx(0.765)
    assert res["by_config"]["fast"]["fraction"] == 0.6 and res["by_config"]["sds"]["fraction"] == 1.0
    assert sorted(calls) == [((), 0), ((), 1), (("x=1",), 0), (("x=1",), 1)]

    # --reuse takes SDS's seeds from a bench_engines JSON after one of them reproduces ...
    per_seed = [fake_series("sds", [], "p", SimpleNamespace(steps=100, eval_every=10), k)["series"] for k in range(2)]
    reuse = tmp_path / "engines.json"
    reuse.write_text(json.dumps({"convergence": {"prompts": {"p": {"per_seed": {"sds": per_seed}}}}}))
    calls.clear()
    monkeypatch.setattr(sys, "argv", argv + ["--reuse", str(reuse)])
    assert bench.main() == 0
    assert sorted(calls) == [((), 0), (("x=1",), 0), (("x=1",), 1)]  # SDS run once, to verify
    assert json.loads(out.read_text())["prompts"]["p"]["by_config"]["fast"]["fraction"] == 0.6
    # ... and refuses one that does not
    per_seed[0][3]["volumetric_iou"] += 0.01
    reuse.write_text(json.dumps({"convergence": {"prompts": {"p": {"per_seed": {"sds": per_seed}}}}}))
    with pytest.raises(SystemExit, match="does not reproduce"):
        bench.main()


def test_bench_convergence_combines_runs_of_one_setting_and_refuses_others(tmp_path, monkeypatch):
    bench = _load("bench_convergence")
    seq = list(bench.CONFIGS["sds_sequence_antithetic"])
    engines = {"steps": 600, "convergence": {"config": "sds_sequence_antithetic", "seeds": 3, "prompts": {
        "a red cube": {"fraction": 0.4, "sds_final_iou": 0.80, "final_iou": 0.84}}}}

    def conv(prompts, steps=600, seeds=3, config=seq):
        return {"steps": steps, "seeds": seeds, "configs": {"sds": ["sds", []], "sds_sequence_antithetic": config},
                "prompts": {p: {"sds_final_iou": 0.7, "by_config": {"sds_sequence_antithetic": {"fraction": f, "final_iou": 0.75}}}
                            for p, f in prompts.items()}}

    paths = {}
    for name, data in {"e": engines, "a": conv({"a blue cone": None, "a green cube": 0.7}), "b": conv({"a red cylinder": 0.9}),
                       "steps": conv({"a blue cube": 0.5}, steps=500), "seeds": conv({"a blue cube": 0.5}, seeds=1),
                       "other": conv({"a blue cube": 0.5}, config=["sds", []]), "again": conv({"a red cube": 0.5})}.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    out = tmp_path / "summary.json"
    argv = ["bench_convergence.py", "--config", "sds_sequence_antithetic", "--out", str(out), "--combine"]
    monkeypatch.setattr(sys, "argv", argv + [str(paths[k]) for k in ("e", "a", "b")])
    assert bench.main() == 0
    summary = json.loads(out.read_text())
    assert summary["measured"] == 4 and summary["at_most_0.7"] == 2  # 0.4 and 0.7; never and 0.9 are not
    assert summary["prompts"]["a green cube"]["source"] == str(paths["a"]) and summary["steps"] == 600
    for bad, why in (("steps", "ran"), ("seeds", "ran"), ("other", "ran"), ("again", "both")):
        monkeypatch.setattr(sys, "argv", argv + [str(paths["e"]), str(paths[bad])])
        with pytest.raises(SystemExit, match=why):
            bench.main()


def test_bench_engines_and_bench_step_write_their_numbers(tmp_path):
    out = tmp_path / "engines.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_engines.py"), "--steps", "4", "--eval-every", "2", "--checkpoints", "1",
           "--draws", "3", "--window", "2", "--adapt", "1", "--nested", "2", "2", "2", "--timing-steps", "1",
           "--configs", "sds,ssd,vsd,sds_antithetic,sds_sequence",
           "--convergence-prompts", "a red cube,a blue cone", "--convergence-seeds", "2", "--out", str(out), "--png", str(tmp_path / "engines.png"),
           "train.batch_size=1", "render.samples=16", "mesh.grid_resolution=32"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    res = json.loads(out.read_text())
    for key in ("variance_ratio_ssd_sds", "variance_ratio_ssd_vsd", "step_time_ratio_ssd_sds", "step_time_ratio_ssd_vsd"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert 0 <= res["inner_fraction"] <= 1.5 and set(res["variance_components"]["2"]["sds"]) >= {"camera", "t", "eps", "total"}
    cost = res["variance_per_cost_vs_sds"]
    assert set(cost) == {"sds", "ssd", "vsd", "sds_antithetic", "sds_sequence"} and cost["sds"]["ratio"] == pytest.approx(1.0)
    for c in cost.values():
        assert c["interval"][0] <= c["ratio"] <= c["interval"][1] and c["seconds_per_step"] > 0
    assert cost["sds_antithetic"]["unet_calls_ratio"] == pytest.approx(2.0)  # two draws per render: twice the UNet samples
    best = res["best_config"]
    assert best == min((n for n in cost if n != "sds"), key=lambda n: cost[n]["ratio"]) == res["steps_to_sds_quality"]["config"]
    assert set(res["steps_to_sds_quality"]["fraction"]) == {"a red cube", "a blue cone"}
    cone = res["convergence"]["prompts"]["a blue cone"]  # two seeds each, the fraction read off their mean
    assert len(cone["per_seed"]["sds"]) == len(cone["per_seed"][best]) == 2 and cone["per_seed"]["sds"][0] != cone["per_seed"]["sds"][1]
    assert cone["sds"][-1]["volumetric_iou"] == pytest.approx(np.mean([r[-1]["volumetric_iou"] for r in cone["per_seed"]["sds"]]))
    assert "steps_ratio_ssd_to_sds_quality" in res and set(res["quality"]) == {"sds", "ssd", "vsd", "ssd_paper"}
    assert [p["step"] for p in res["quality"]["ssd"]] == [0, 2, 4] and all(0 <= p["volumetric_iou"] <= 1 for p in res["quality"]["ssd"])
    assert (tmp_path / "engines.png").read_bytes()[:4] == b"\x89PNG"

    out = tmp_path / "step.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_step.py"), "--engines", "sds,ssd", "--steps", "1", "--warmup", "0", "--out", str(out),
           "--profile", str(tmp_path / "profile")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["device"].startswith("cpu")
    for engine in ("sds", "ssd"):
        e = res["engines"][engine]
        assert e["step_seconds"] > e["unet_cfg_seconds"] > 0 and e["step_over_unet"] > 1 and e["step_over_unet_paired"] > 1
        assert {"render", "backward", "unet_cfg"} <= set(e["breakdown"])
        mesh = e["mesh_stage"]  # the mesh stage, from the NeRF stage's field
        assert mesh["stage"] == "mesh" and mesh["faces"] > 0
        assert mesh["step_seconds"] > mesh["unet_cfg_seconds"] > 0 and {"render", "backward", "unet_cfg"} <= set(mesh["breakdown"])
    # The ratios' arithmetic is checked on known inputs above; here, that the run reports them.
    assert all(math.isfinite(res[k]) and res[k] > 0 for k in ("step_time_ratio_ssd_sds", "step_time_ratio_ssd_sds_paired"))
    assert "step_time_ratio_ssd_vsd" not in res  # VSD not run
    assert res["engines"]["sds"]["backends"]["hashgrid"] in ("cpu", "torch")  # what served the field
    for engine in ("sds", "ssd"):  # the profiler's table of the same step
        table = (tmp_path / f"profile.{engine}.txt").read_text()
        assert table.startswith("4 NeRF-stage steps") and "aten::" in table


def test_bench_engines_measures_each_state_fresh_and_as_training_renders_it(monkeypatch):
    """The variance meter's two defects: every (configuration, state) gets a stage of its own, and the
    stage renders at that state's step (the shading schedule), not at step 0 (albedo only); what an
    estimator fits is fitted there (update=True) and frozen while it is measured (update=False)."""
    bench = _load("bench_engines")
    made, seen = [], []

    class FakeField:
        def load_state_dict(self, state):
            self.state = state

        def parameters(self):
            return []

    def make(engine, args, extra=(), prompt=None):
        made.append(SimpleNamespace(engine=engine, field=FakeField(), step_index=0, ctx=SimpleNamespace(reshift=lambda: None)))
        return made[-1]

    monkeypatch.setattr(bench, "make_stage", make)
    monkeypatch.setattr(bench, "draw_g", lambda stage, update, independent=True: seen.append(
        (stage.engine, stage.step_index, stage.field.state, update)) or (None, torch.zeros(1)))
    monkeypatch.setattr(bench, "induced_theta_grad", lambda x, grad, params: [torch.randn(3)])
    args = SimpleNamespace(adapt=2, draws=3, window=2)
    for name in ("sds", "ssd"):
        for step in (100, 200):
            m = bench.step_measure(name, f"state-{step}", step, args)
            assert m["samples"].count == m["single"].count == 3 and m["stage"].step_index == step
    assert len(made) == 4 and len({id(s) for s in made}) == 4
    for e, adapt in (("sds", 0), ("ssd", 2)):
        for step in (100, 200):  # windows of 2 steps: the state's step and the next, as training would go on
            assert seen.count((e, step, f"state-{step}", True)) == adapt
            assert seen.count((e, step, f"state-{step}", False)) == seen.count((e, step + 1, f"state-{step}", False)) == 3


def test_bench_engines_configurations_start_from_plain_sampling_whatever_the_preset(monkeypatch):
    """"sds" is plain SDS, the reference of every ratio, even where the preset samples from the view
    sequence; a configuration turns each reducer on by name."""
    from steindreamer.config import load_config

    bench = _load("bench_engines")
    built = []
    monkeypatch.setattr(bench, "DiffusionGuidance", lambda *a, **k: None)
    monkeypatch.setattr(bench, "Context", lambda prompt, cfg, guidance: built.append(cfg))
    monkeypatch.setattr(bench, "NeRFStage", lambda ctx: None)
    args = SimpleNamespace(preset="toy", override=[], seed=0, prompt="a red cube")
    for name in ("sds", "sds_sequence", "sds_sequence_antithetic"):
        engine, extra = bench.CONFIGS[name]
        bench.make_stage(engine, args, extra)
    preset = load_config("toy")
    assert (preset.camera.sampling, preset.guidance.noise.t_sampling) == ("sequence", "sequence")
    sds, seq, pair = built
    assert (sds.camera.sampling, sds.guidance.noise.t_sampling, sds.guidance.noise.draws) == ("iid", "iid", 1)
    assert (seq.camera.sampling, seq.guidance.noise.t_sampling, seq.guidance.noise.antithetic) == ("sequence", "sequence", False)
    assert pair.guidance.noise.antithetic and pair.guidance.noise.draws == 2 and pair.camera.sampling == "sequence"


def test_bench_quality_quick_checks_the_exported_glbs(tmp_path):
    """bench_quality at a tiny size: every number in its JSON is the shape check of the GLB it wrote,
    the totals add up, the gallery has a strip per asset."""
    from PIL import Image

    from steindreamer.toy import shape3d

    out = tmp_path / "quality.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_quality.py"), "--quick", "--limit", "2", "--work", str(tmp_path / "runs"),
           "--out", str(out), "--engines", "sds,truth", "--set", "train.steps=20", "--set", "mesh.steps=4",
           "--set", "train.val_every=1000"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["prompts"] == ["a red cube", "a orange pyramid"]
    assert [r["engine"] for r in res["results"]] == ["sds", "sds", "truth", "truth"]
    assert all("failed" not in r for r in res["results"]), [r.get("failed") for r in res["results"]]
    assert res["by_engine"]["truth"]["assets"] == 2  # the ceiling's runs (scripts/truth_generate.py) are checked alike
    rows = res["results"][:2]
    for r in res["results"]:
        again = shape3d.check_glb(Path(r["run"]) / "model.glb", r["prompt"])
        assert again["volumetric_iou"] == pytest.approx(r["volumetric_iou"]) and again["shape"] == r["shape"]
        assert r["right"] == (r["shape"] == r["prompt"].split()[-1] and r["colour"] == r["prompt"].split()[1])
        if r["khronos"] is not None:
            assert r["khronos"]["numErrors"] == 0, r["khronos"]
    s = res["by_engine"]["sds"]
    assert s["assets"] == 2 and s["right"] == sum(r["right"] for r in rows) and s["cubes"] == 1 and s["tori"] == 0
    assert s["mean_volumetric_iou"] == pytest.approx(sum(r["volumetric_iou"] for r in rows) / 2)
    assert 0 < s["seconds_per_asset_mean"] <= s["seconds_per_asset_max"]
    w, h = Image.open(res["gallery"]).size
    assert h == 4 * 96 and w > 6 * 96
    grid = np.asarray(Image.open(res["grid"]).convert("RGB"))
    assert grid.shape == (128, 6 * 128, 3)  # one row of 6 cells, 4 filled
    for i, r in enumerate(res["results"]):  # each cell framed green (right) or red (wrong)
        assert tuple(grid[0, i * 128 + 64]) == ((40, 160, 60) if r["right"] else (220, 40, 40))
    assert (grid[:, 4 * 128:] == 255).all()


def test_truth_engine_pulls_each_render_to_the_worlds_true_render():
    """bench_quality's `truth` engine (the ceiling): G is zero at the true render and a step along -G
    moves a wrong render towards it."""
    truth_generate = _load("truth_generate")
    from steindreamer.cameras import make_cameras
    from steindreamer.guidance.config import GuidanceConfig
    from steindreamer.guidance.diffusion import DiffusionGuidance
    from steindreamer.toy.world import render_shape

    guide = DiffusionGuidance("builtin", torch.device("cpu"))
    distiller = truth_generate.true_image_distiller("red", "cube")(GuidanceConfig(), guide)
    cams = make_cameras([20.0, -5.0], [30.0, 200.0], [2.0, 2.0], [45.0, 45.0])
    true = render_shape("cube", "red", cams, 32, 32, supersample=truth_generate.SUPERSAMPLE)["rgb"]
    wrong = render_shape("sphere", "blue", cams, 32, 32, supersample=1)["rgb"]
    for rgb, zero in ((true, True), (wrong, False)):
        x = guide.encode(rgb.permute(0, 3, 1, 2))
        g, logs = distiller.gradient(x, {"rgb": rgb}, cams, None, None, None, None)
        assert logs["finite"] and (g.abs().max() < 1e-6) == zero
    target = guide.encode(true.permute(0, 3, 1, 2))
    assert (x - 0.05 * g - target).norm() < (x - target).norm()


def test_bench_yaw_gap_is_zero_for_a_round_shape_and_not_for_a_cube():
    bench = _load("bench_yaw")
    from steindreamer.guidance.diffusion import DiffusionGuidance

    guide = DiffusionGuidance("builtin", torch.device("cpu"))
    round_ = bench.denoising_gap(guide, "red", "cylinder", [0.0, 30.0], 15.0, draws=2, seed=0)
    assert abs(round_["gap"]) < 1e-4 * round_["loss_right"]  # turning a cylinder changes nothing
    assert abs(round_["critic_logp_gap"]) < 1e-4  # the shipped model's camera critic: same image, same log p
    cube = bench.denoising_gap(guide, "red", "cube", [0.0, 30.0], 15.0, draws=2, seed=0)
    assert cube["loss_turned"] != cube["loss_right"] and abs(cube["critic_logp_gap"]) > 1e-3


def test_bench_start_from_truth_begins_right_and_from_the_blob_round():
    """The diagnosis' two starts: the field fitted to the true cube is checked as a cube before any
    distillation step; the preset's blob is a sphere."""
    bench = _load("bench_start")
    truth = bench.run("a red cube", "truth", steps=1, every=1, preset="toy", overrides=["train.val_every=1000"])
    blob = bench.run("a red cube", "blob", steps=1, every=1, preset="toy", overrides=["train.val_every=1000"])
    assert truth["trace"][0]["shape"] == "cube" and truth["trace"][0]["volumetric_iou"] > 0.75
    assert blob["trace"][0]["shape"] == "sphere"
    assert [r["step"] for r in truth["trace"]] == [0, 1]


def test_torture_five_kills_end_equal_to_an_uninterrupted_run(tiny_pixel_model, tmp_path):
    """scripts/torture.py at test size: 5 SIGKILLs in drawn phases, each followed by --resume; every
    checkpoint left loads, and the finished run's tensors, metrics and GLB equal the uninterrupted
    run's."""
    out = tmp_path / "torture.json"
    sets = [f"model={tiny_pixel_model}", "steps=12", "train.ckpt_every=3", "train.val_every=6", "mesh.steps=6",
            "mesh.ckpt_every=2", "export.turntable_frames=4", "train.threads=1"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "torture.py"), "--kills", "5", "--seed", "1",
                           *(a for s in sets for a in ("--set", s)), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["kills"] == 5 and report["resumes_failed"] == 0 and report["unreadable_checkpoints"] == 0
    assert report["resumes_finished"] == report["resumes"] >= 5
    assert sum(report["kills_by_phase"].values()) == 5  # where the timed ones land varies; inside a write: test_faults
    assert report["rounds_matching"] == report["rounds"] >= 1
    assert report["max_tensor_difference"] <= 1e-6
    assert all(r["strays"] == [] and r["glb_vertex_difference"] <= 1e-4 for r in report["per_round"])


def test_torture_comparison_catches_a_different_run(tiny_pixel_model, tmp_path):
    """The torture script's end check fails a run that is not the uninterrupted one (another seed)."""
    from steindreamer.cli import main

    torture = _load("torture")

    base = ["--preset", "toy", f"model={tiny_pixel_model}", "steps=4", "train.ckpt_every=2", "mesh.steps=2",
            "export.turntable=false", "--quiet"]
    assert main(["generate", "a red cube", "--out", str(tmp_path / "a"), *base]) == 0
    assert main(["generate", "a red cube", "--out", str(tmp_path / "b"), *base, "seed=1"]) == 0
    same = torture.compare(tmp_path / "a", tmp_path / "a")
    assert same["max_tensor_difference"] == 0.0 and same["metrics_steps_match"] and same["glb_vertex_difference"] == 0.0
    other = torture.compare(tmp_path / "b", tmp_path / "a")
    assert other["max_tensor_difference"] > 1e-3


def _bench_memory(tiny_pixel_model, out, modes, *extra):
    # Checkpoints every 40 steps; one validation grid and plot, at the end: matplotlib's caches take
    # ~15 plots to fill (~3 MiB each, then flat; measured), which the 3000-step benchmark covers.
    sets = [f"model={tiny_pixel_model}", "resolution=16", "render.samples=16", "train.ckpt_every=40", "train.val_every=1000",
            "train.threads=1"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--steps", "240", "--every", "10",
                           "--modes", modes, *(a for s in sets for a in ("--set", s)), *extra, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_bench_memory_rss_stays_flat_with_the_viewer_off_and_on(tiny_pixel_model, tmp_path):
    """scripts/bench_memory.py at test size: resident memory after the warm-up stays within 10 % with
    the viewer off and on (checkpoints included); the same meter sees 8 MiB a
    step that is kept."""
    report = _bench_memory(tiny_pixel_model, tmp_path / "memory.json", "off,on")
    assert set(report["modes"]) == {"off", "on"} and report["flat"], {m: r["growth"] for m, r in report["modes"].items()}
    assert all(r["steps"] == 240 and len(r["samples"]) >= 24 for r in report["modes"].values())
    # The meter itself (in this process, to save a start-up): 8 MiB kept per step must be seen.
    sets = [f"model={tiny_pixel_model}", "resolution=16", "render.samples=16", "train.threads=1"]
    leaking = _load("bench_memory").child(60, 10, False, sets, leak_kib=8192)
    assert not leaking["flat"] and leaking["growth"] > 1.2, leaking["growth"]


def test_plots_free_what_they_allocate_as_a_run_grows(tmp_path):
    """The loss and variance plots are drawn at every validation of a run whose metrics grow: what a
    plot allocates is freed when it returns (a figure is a web of reference cycles; left to the cyclic
    collector's rare full pass, a 3000-step toy run's resident memory grew ~5 MiB a plot), and the
    variance curve shows the file's numbers."""
    import gc
    import tracemalloc

    from steindreamer.plots import plot_run, read_columns

    def grow(start: int, n: int) -> None:
        with open(tmp_path / "metrics.jsonl", "a") as f:
            for s in range(start, start + n):
                row = {"step": s, "loss": 1.0 + math.sin(s), "engine": "sds", "t": s % 97, "grad_norm": 0.1, "seconds": 0.05}
                f.write(json.dumps({**row, "variance": 1.0 / (1 + s)} if s % 50 == 0 else row) + "\n")

    grow(0, 300)
    plot_run(tmp_path)  # imports and font caches, once
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(1, 4):
            grow(300 * i, 300)
            assert [p.name for p in plot_run(tmp_path)] == ["loss.png", "variance.png"]
        kept = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert kept < 512 * 1024, f"{kept / 2**20:.1f} MiB still allocated after 3 plots"
    cols = read_columns(tmp_path / "metrics.jsonl")
    assert len(cols["step"]) == 1200 and cols["variance"][-1] == (1150, 1.0 / 1151)
