"""Training: one loop (`loop.run_stage`) driving two stages that differ by what they optimise, the
NeRF (`nerf.NeRFStage`) and the mesh refined from its surface (`mesh.MeshStage`). Both share one
`context.Context` (prompts, guidance and estimator, generator, background); `stage.Stage` is the
distillation step they have in common, `guard` the divergence recovery."""
from .context import Context
from .loop import StopTraining, run_stage
from .mesh import MeshStage
from .nerf import NeRFStage
from .stage import Cadence, Stage

__all__ = ["Cadence", "Context", "MeshStage", "NeRFStage", "Stage", "StopTraining", "run_stage"]
