"""Command line: `steindreamer generate "PROMPT" [--preset NAME | --config FILE] [--out RUN_DIR]
[--resume] [--overwrite] [key=value ...]`. Bad input is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import RunFailed, UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, status 2
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from .config import SHORT_KEYS, presets
    from .export.pipeline import FORMATS

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
    exp.add_argument("--format", action="append", choices=FORMATS, help="repeatable; default: the run's export.formats")
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
    from .assets import export_run
    from .runfolder import RunFolder

    formats = args.format or RunFolder(args.run_dir).read_config().export.formats
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


def cmd_generate(args) -> int:
    from .config import check_machine, config_from_saved, load_config
    from .guidance.locate import locate_all
    from .prompt import check_prompt
    from .runfolder import RunFolder

    cfg = load_config(args.preset or (None if args.config else "steindreamer"), args.config, args.overrides)
    run = RunFolder(_run_dir(args, cfg))
    if args.resume and run.config.exists() and not (args.preset or args.config):
        # Resuming without naming a preset: the run's own config, plus any overrides (e.g. more steps).
        cfg = config_from_saved(run.config_text(), args.overrides)
    if args.no_mesh:
        cfg.mesh.enabled = False
    # Everything a user can get wrong is checked before the heavy libraries load and before the run
    # folder is touched: a refused item fails in a second and leaves nothing behind.
    check_machine(cfg)
    check_prompt(args.prompt)  # its form first; the model's vocabulary once the model is found
    # Models are found offline first; one that cannot be had is one line within seconds (locate.py).
    location = locate_all(cfg.guidance)["diffusion"]
    prompt = check_prompt(args.prompt, location if Path(location).is_dir() else None)
    run.prepare(args.resume, args.overwrite)
    run.write_start(cfg, prompt)
    if cfg.train.threads > 0:  # a process-wide setting: the command's to make, not a stage's
        import torch

        torch.set_num_threads(cfg.train.threads)
    viewer = None
    if args.viewer:
        from .viewer import ViewerCallback

        viewer = ViewerCallback(args.host, args.port, run.root)
    from .pipeline import generate

    try:
        result = generate(prompt, cfg, run.root, resume=args.resume, show_progress=not args.quiet,
                          callbacks=(viewer,) if viewer is not None else ())
    except OSError as err:  # e.g. the disk filled up mid-run; every file written is whole (fsio)
        raise RunFailed(f"{_os_error(err)}; the run folder keeps its last complete checkpoint: "
                        "free some space (or fix the folder) and continue with --resume") from None
    finally:
        if viewer is not None:
            viewer.close()
    if result["stopped"]:
        print(f"stopped at step {result['steps']}; continue with --resume -> {run.root}")
    else:
        print(f"done: {result['steps']} steps in {result['seconds']:.1f} s -> {run.root}")
    return 0


def _os_error(err: OSError) -> str:
    return f"{err.strerror or err}: {err.filename}" if err.filename else str(err.strerror or err)


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
