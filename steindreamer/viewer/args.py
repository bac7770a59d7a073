"""The viewer's command-line options: `generate --viewer [--port N] [--host H]` and the `view`
subcommand's parser."""
from __future__ import annotations

import argparse

DEFAULT_PORT = 8080


def add_viewer_args(parser: argparse.ArgumentParser) -> None:
    """`generate --viewer [--port N] [--host H]`."""
    group = parser.add_argument_group("live viewer")
    group.add_argument("--viewer", action="store_true", help="serve a live web viewer of the training run")
    _add_server_args(group)


def _add_server_args(parser) -> None:
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"viewer port (default {DEFAULT_PORT}; the next free one if taken, 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the viewer to the network)")


def add_view_parser(subparsers) -> argparse.ArgumentParser:
    view = subparsers.add_parser("view", help="look at a run's NeRF or an exported mesh in the browser",
                                 description="Serve a web viewer for RUN_DIR (its latest NeRF checkpoint) or a GLB/glTF mesh. Ctrl-C stops it.")
    view.add_argument("target", metavar="RUN_DIR_OR_GLB", help="a run folder or a .glb/.gltf file")
    _add_server_args(view)
    view.add_argument("--max-seconds", type=float, default=None, help=argparse.SUPPRESS)  # tests: stop by itself
    return view
