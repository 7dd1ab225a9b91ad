"""CT angle sets: their coverage and the hot start they call for."""

import numpy as np
import pytest


def test_angular_coverage_counts_views_and_arc_modulo_180():
    from napari_diffrecon.physics.ct import angular_coverage, limited_angle_angles, sparse_view_angles

    assert angular_coverage(sparse_view_angles(23)) == pytest.approx((23, 180.0))
    assert angular_coverage(limited_angle_angles(90.0)) == (90, 90.0)  # 0°, 1°, …, 89°: a 90° scan
    assert angular_coverage(limited_angle_angles(150.0, n_views=20)) == pytest.approx((20, 150.0))
    assert angular_coverage(np.array([30.0, 0.0, 60.0, 90.0]) + 200.0) == (4, 120.0)  # unsorted, past 180°
    assert angular_coverage(sparse_view_angles(8, arc=360.0)) == (4, 180.0)  # θ and θ + 180° are the same view
    assert angular_coverage([10.0, 190.0, 10.0]) == (1, 0.0)
    assert angular_coverage([179.99999999, 0.0, 90.0])[0] == 2  # 180° is 0°


def test_default_hot_start_is_tv_for_few_views_or_a_limited_arc():
    from napari_diffrecon.physics.ct import limited_angle_angles, sparse_view_angles
    from napari_diffrecon.reconstruct import default_hot_start

    def ct(angles):
        return {"modality": "ct", "image_shape": [64, 64], "angles_deg": angles}

    assert default_hot_start(ct(sparse_view_angles(23))) == "fbp"
    assert default_hot_start(ct(sparse_view_angles(14))) == "fbp"
    assert default_hot_start(ct(sparse_view_angles(12))) == "tv"
    assert default_hot_start(ct(limited_angle_angles(90.0))) == "tv"
    assert default_hot_start(ct(limited_angle_angles(140.0))) == "tv"
    assert default_hot_start(ct(limited_angle_angles(144.0))) == "tv"
    assert default_hot_start(ct(limited_angle_angles(145.0))) == "fbp"  # "an arc under 145°"
    assert default_hot_start(ct(limited_angle_angles(150.0))) == "fbp"
    assert default_hot_start({**ct(sparse_view_angles(8)), "modality": "CT"}) == "tv"  # spelled as in a DICOM header
    assert default_hot_start({"modality": "mri"}) == "cg" and default_hot_start({"modality": "pet"}) == "tv"
