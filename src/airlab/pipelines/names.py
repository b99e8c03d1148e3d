"""The names of the presets and metrics, kept apart from the schema so that the command line
can offer them as choices without importing pydantic, YAML or the engine."""

__all__ = ["PRESETS", "METRICS"]

PRESETS = ("rigid", "affine", "bspline", "diffeomorphic", "intersubject")
METRICS = ("mse", "ncc", "lncc", "mi", "nmi", "ngf", "ssim")
