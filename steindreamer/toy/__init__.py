"""The toy world (six coloured primitives, rendered exactly) and the built-in models trained on it.

- `world`: shapes, colours, cameras (TOY_CAMERA), `render_shape`, captions, HELD_OUT pairs
- `vocab`: the built-in model's words and the offline CLIP tokenizer
- `model`: architectures, shipped folders, loading and sampling helpers
- `checker`: ground-truth scoring of generated images and depth maps
"""
from .vocab import WORDS
from .world import (COLOURS, HELD_OUT, SHAPES, TOY_CAMERA, TOY_RESOLUTION, TRAIN_PAIRS, caption, render_shape,
                    training_captions)

__all__ = ["COLOURS", "HELD_OUT", "SHAPES", "TOY_CAMERA", "TOY_RESOLUTION", "TRAIN_PAIRS", "WORDS", "caption",
           "render_shape", "training_captions"]
