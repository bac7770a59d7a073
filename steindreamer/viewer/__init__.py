"""Live web viewer on viser: watch the NeRF train from any angle (`generate --viewer`), or look at a
finished run or an exported mesh (`steindreamer view RUN_DIR_OR_GLB`).

Each browser orbits its own camera. For a NeRF the server renders the field from that camera with
our volume renderer and sends the frame as that client's scene background image (viser stretches it
over the canvas, so frames are rendered at the canvas' aspect). A mesh goes to the browser as GLB
and three.js draws it there. viser is imported lazily: the rest of steindreamer runs without it.

Modules: `args` (the command-line options), `frames` (viser camera to ours, frame size, rendering
one frame), `budget` (the viewer's share of training time), `server` (the viser server and its
clients), `live` (the callback during training), `view` (the `view` command).
"""
from .args import DEFAULT_PORT, add_view_parser, add_viewer_args
from .budget import VIEWER_SHARE, FrameBudget
from .frames import frame_size, quat_to_matrix, rotation_y, viser_to_cameras
from .live import GUI_INTERVAL, PLOT_POINTS, ViewerCallback
from .view import IDLE_REFINE, TURNTABLE_PERIOD, cmd_view

__all__ = ["DEFAULT_PORT", "GUI_INTERVAL", "IDLE_REFINE", "PLOT_POINTS", "TURNTABLE_PERIOD", "VIEWER_SHARE", "FrameBudget",
           "ViewerCallback", "add_view_parser", "add_viewer_args", "cmd_view", "frame_size", "quat_to_matrix",
           "rotation_y", "viser_to_cameras"]
