"""The names a pipeline may use, kept apart from the schema and the engine: the command line
offers the preset and metric names as choices without importing pydantic, YAML or the engine,
and the schema validates a pipeline without importing PyTorch (a batch runner's parent process
only sends pipelines to its workers; importing torch there cost about 1.2 s of its start-up).

The built-in transforms, losses and regularisers are listed with the options their
constructors take; tests/test_pipelines_schema.py holds these tables equal to the registries
(``transforms.TRANSFORMS``, ``losses.LOSSES``, ``regularisers.REGULARISERS``). A name added to a
registry at run time (a user's own loss) is not here, and the schema asks the registry."""

__all__ = ["PRESETS", "METRICS", "TRANSFORM_NAMES", "LINEAR_TRANSFORMS", "LOSS_OPTIONS", "REGULARISER_OPTIONS", "LATTICE_REGULARISERS"]

PRESETS = ("rigid", "affine", "bspline", "diffeomorphic", "intersubject", "smooth")
METRICS = ("mse", "ncc", "lncc", "mi", "nmi", "ngf", "ssim")

TRANSFORM_NAMES = ("translation", "rigid", "similarity", "affine", "bspline", "velocity", "dense-velocity", "wendland")
LINEAR_TRANSFORMS = TRANSFORM_NAMES[:4]

# name -> the parameters of its constructor, as inspect.signature names them
LOSS_OPTIONS = {
    "mse": ("args", "kwargs"),
    "ncc": ("eps",),
    "lncc": ("radius", "kernel", "radius_mm", "eps"),
    "mi": ("bins", "normalized", "fixed_range", "moving_range"),
    "nmi": ("bins", "fixed_range", "moving_range"),
    "ngf": ("eps",),
    "ssim": ("data_range", "sigma"),
}
REGULARISER_OPTIONS = {
    "diffusion": ("args", "kwargs"),
    "bending": ("args", "kwargs"),
    "tv": ("eps",),
    "tv-l1": ("args", "kwargs"),
    "sparsity": ("args", "kwargs"),
    "folding": ("threshold",),
    "coefficients-l1": ("args", "kwargs"),
    "coefficients-l2": ("args", "kwargs"),
    "coefficients-diffusion": ("args", "kwargs"),
    "coefficients-tv": ("eps",),
    "coefficients-tv-l1": ("args", "kwargs"),
}
# regularisers of a coefficient lattice (regularisers.ParameterRegulariser)
LATTICE_REGULARISERS = ("coefficients-l1", "coefficients-l2", "coefficients-diffusion", "coefficients-tv",
                        "coefficients-tv-l1")
