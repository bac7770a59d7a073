"""steindreamer: text-to-3D by score distillation (SDS, VSD and Stein Score Distillation)."""
__version__ = "0.1.0"
