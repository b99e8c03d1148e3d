"""``airlab.template.build``: an unbiased template of a group of images (see ``airlab template``).

Kept out of ``import airlab``, like :mod:`airlab.batch`; Dask is imported only when a run uses it.
The algorithm and the files are described in :mod:`airlab.workflows.template`; its numerics
(streamed means, the shape update, sharpness) are in :mod:`airlab.groupwise`."""

from .groupwise import RunningMean, shape_update, sharpen, sharpness
from .workflows.template import TemplateProgress, TemplateSummary, build, image_names

__all__ = ["build", "TemplateSummary", "TemplateProgress", "image_names", "RunningMean", "shape_update", "sharpen",
           "sharpness"]
