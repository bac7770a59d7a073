"""Command line: `steindreamer generate "PROMPT" [--preset NAME | --config FILE] [--out RUN_DIR]
[--resume] [--overwrite] [key=value ...]`. Bad input is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .errors import RunFailed, UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, status 2
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from .config import SHORT_KEYS, presets

    parser = _Parser(prog="steindreamer", description="Text-to-3D by score distillation (SDS, VSD, SSD).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="optimise a 3D scene for a prompt",
                         description="Optimise a NeRF so every view matches PROMPT. Short override keys: "
                         + ", ".join(f"{k} ({v})" for k, v in SHORT_KEYS.items()) + f". Presets: {', '.join(presets())}.")
    gen.add_argument("prompt", help='the text prompt, e.g. "a red cube"')
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a preset from configs/ (default: steindreamer)")
    src.add_argument("--config", help="a YAML config file")
    gen.add_argument("--out", help="run folder (default: outputs/<prompt-slug>-<seed>)")
    gen.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    gen.add_argument("--overwrite", action="store_true", help="delete an existing run folder and start over")
    gen.add_argument("--no-mesh", action="store_true", help="skip the mesh stage (export the NeRF's surface as is)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=200 seed=1")
    exp = sub.add_parser("export", help="write mesh files from a run's latest checkpoint",
                         description="Write model.glb / mesh.obj (+ .mtl, .png) / mesh.ply into RUN_DIR from its newest checkpoint "
                         "(the mesh stage's if it ran, else the surface extracted from the NeRF).")
    exp.add_argument("run_dir")
    exp.add_argument("--format", action="append", choices=["glb", "obj", "ply"], help="repeatable; default: the run's export.formats")
    exp.add_argument("--stage", choices=["auto", "nerf", "mesh"], default="auto")
    ren = sub.add_parser("render", help="write a turntable video and contact sheet of a run",
                         description="Write RUN_DIR/turntable.mp4 (GIF if ffmpeg fails) and renders/contact_sheet.png.")
    ren.add_argument("run_dir")
    ren.add_argument("--stage", choices=["auto", "nerf", "mesh"], default="auto")
    ren.add_argument("--frames", type=int, default=None)
    ren.add_argument("--size", type=int, default=None)
    from . import batch
    from .viewer import add_view_parser, add_viewer_args

    add_viewer_args(gen)
    add_view_parser(sub)
    batch.add_parser(sub)
    return parser


def cmd_export(args) -> int:
    from .assets import export_run, load_run_config

    formats = args.format or load_run_config(args.run_dir).export.formats
    result = export_run(Path(args.run_dir), formats, args.stage)
    for fmt, path in result["paths"].items():
        print(f"{fmt}: {path}")
    return 0


def cmd_render(args) -> int:
    from .assets import render_run

    if (args.frames is not None and args.frames < 1) or (args.size is not None and args.size < 8):
        raise UserError("--frames must be >= 1 and --size >= 8")
    print(f"turntable: {render_run(Path(args.run_dir), args.stage, args.frames, args.size)}")
    return 0


def _run_dir(args, cfg) -> Path:
    from .fsio import slugify

    return Path(args.out) if args.out else Path("outputs") / f"{slugify(args.prompt)}-{cfg.train.seed}"


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    started = (run_dir / "config.yaml").exists() or (run_dir / "checkpoints").exists()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output path exists and is not a folder: {run_dir}")
    if started and not resume:
        if not overwrite:
            raise UserError(f"run folder {run_dir} already exists; use --resume to continue it or --overwrite to start over")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
        if resume:  # temp files of writes cut by a crash (the NeRF stage sweeps checkpoints/)
            for stale in [*run_dir.glob(".*.tmp"), *run_dir.glob("renders/.*.tmp")]:
                stale.unlink(missing_ok=True)
    except OSError as err:
        raise UserError(f"cannot write to output folder {run_dir}: {err.strerror or err}") from None


def cmd_generate(args) -> int:
    from .config import from_yaml_text, load_config, to_yaml
    from .fsio import atomic_write
    from .pipeline import generate

    if not args.prompt.strip():
        raise UserError("the prompt is empty")
    cfg = load_config(args.preset or (None if args.config else "steindreamer"), args.config, args.overrides)
    run_dir = _run_dir(args, cfg)
    saved = run_dir / "config.yaml"
    if args.resume and saved.exists() and not (args.preset or args.config):
        # Resuming without naming a preset: the run's own config, plus any overrides (e.g. more steps).
        try:
            base = saved.read_text()
        except OSError as err:
            raise UserError(f"cannot read {saved}: {err.strerror}") from None
        cfg = from_yaml_text(base)
        if args.overrides:
            from omegaconf import OmegaConf

            load_config(None, None, args.overrides)  # validates the overrides alone
            merged = OmegaConf.merge(OmegaConf.create(base), OmegaConf.from_dotlist(_expand(args.overrides)))
            cfg = from_yaml_text(OmegaConf.to_yaml(merged))
    if args.no_mesh:
        cfg.mesh.enabled = False
    # Model folders are checked before the heavy libraries load: a bad item fails in a second.
    from .guidance.diffusion import resolve_model

    resolve_model(cfg.guidance.model, "diffusion")
    if cfg.guidance.engine == "ssd" and cfg.guidance.baseline != "constant":
        resolve_model(cfg.guidance.depth_model, "depth")
    _prepare_run_dir(run_dir, args.resume, args.overwrite)
    try:
        atomic_write(saved, to_yaml(cfg))
        (run_dir / "prompt.txt").write_text(args.prompt.strip() + "\n")
    except OSError as err:
        raise UserError(f"cannot write to output folder {run_dir}: {err.strerror or err}") from None
    viewer = None
    if args.viewer:
        from .viewer import ViewerCallback

        viewer = ViewerCallback(args.host, args.port, run_dir)
    try:
        result = generate(args.prompt, cfg, run_dir, resume=args.resume, show_progress=not args.quiet,
                          callbacks=(viewer,) if viewer is not None else ())
    except OSError as err:  # e.g. the disk filled up mid-run; every file written is whole (fsio)
        raise RunFailed(f"{_os_error(err)}; the run folder keeps its last complete checkpoint: "
                        "free some space (or fix the folder) and continue with --resume") from None
    finally:
        if viewer is not None:
            viewer.close()
    print(f"done: {result['steps']} steps in {result['seconds']:.1f} s -> {run_dir}")
    return 0


def _os_error(err: OSError) -> str:
    return f"{err.strerror or err}: {err.filename}" if err.filename else str(err.strerror or err)


def _expand(overrides: list[str]) -> list[str]:
    from .config import SHORT_KEYS

    out = []
    for item in overrides:
        key, value = item.split("=", 1)
        out.append(f"{SHORT_KEYS.get(key.strip(), key.strip())}={value}")
    return out


def cmd_view(args) -> int:
    from .viewer import cmd_view as view

    return view(args)


def cmd_batch(args) -> int:
    from .batch import main as run_batch

    return run_batch(args)


COMMANDS = {"generate": cmd_generate, "export": cmd_export, "render": cmd_render, "view": cmd_view, "batch": cmd_batch}


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        # Overrides may follow options (`--out D steps=5`): argparse leaves those for us.
        args, extra = parser.parse_known_args(argv)
        stray = [e for e in extra if e.startswith("-") or "=" not in e]
        if stray:
            raise UserError(f"steindreamer: unrecognized arguments: {' '.join(stray)}")
        if hasattr(args, "overrides"):
            args.overrides = list(args.overrides) + extra
        elif extra:
            raise UserError(f"steindreamer {args.command}: takes no key=value overrides: {' '.join(extra)}")
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk or lost folder in export/render/...: one line, no traceback
        print(f"error: {_os_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
