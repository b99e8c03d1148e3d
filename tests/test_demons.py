"""airlab.demons: diffeomorphic demons recovers a known deformation without folding."""

from airlab.demons import demons
from airlab.pipelines import preset
from airlab.registration import Level

from conftest import brain_epe, quick


def test_demons_recovers_the_deformation(pair):
    fixed, moving, truth = pair
    affine = quick(preset("affine", fixed.grid)[:2])(fixed, moving)
    result = demons(fixed, moving, initial=affine.transform,
                    levels=[Level(4, 4.0, 60), Level(2, 2.0, 60), Level(1, 0.0, 40)])
    assert brain_epe(result.transform, truth, fixed) < 0.6 * brain_epe(affine.transform, truth, fixed)
    from airlab.evaluate import jacobian_stats

    field = result.stages[0].field.detach()[0]
    assert jacobian_stats(field, result.stages[0].grid)["folding_count"] == 0
