"""The one sphere-axes-to-view rule (spheretorch.sphere.layout)."""

import numpy as np
import pytest
import torch

from spheretorch.sphere.layout import canonical_sphere_dims, sphere_layout


@pytest.mark.parametrize(
    ("shape", "dims", "expected"),
    [
        ((4, 5), -1, (4, 5, 1)),
        ((4, 5), 0, (1, 4, 5)),
        ((2, 3, 4, 5), 2, (6, 4, 5)),
        ((8, 3, 3, 3), (1, 2, 3), (8, 27, 1)),
        ((8, 3, 3, 3), (-3, -2), (8, 9, 3)),
        ((8, 3, 3, 3), None, (1, 216, 1)),
        ((7,), np.int64(0), (1, 7, 1)),
    ],
)
def test_layout_views_each_sphere(shape, dims, expected):
    lay = sphere_layout(shape, dims)
    assert (lay.outer, lay.size, lay.inner) == expected
    t = torch.arange(float(np.prod(shape))).reshape(shape)
    v = lay.view(t)
    assert v.data_ptr() == t.data_ptr()
    assert lay.count == expected[0] * expected[2]


def test_layout_slices_match_the_axes():
    t = torch.randn(2, 3, 4, 5)
    v = sphere_layout(t.shape, (1, 2)).view(t)
    assert torch.equal(v[1, :, 3], t[1, :, :, 3].reshape(-1))


@pytest.mark.parametrize(
    ("dims", "error", "match"),
    [
        ((0, 2), ValueError, "adjacent"),
        ((1, 1), ValueError, "twice"),
        ((), ValueError, "at least one"),
        (4, ValueError, "out of range"),
        (True, TypeError, "int"),
        (1.0, TypeError, "int"),
    ],
)
def test_bad_dims_are_one_line_errors(dims, error, match):
    with pytest.raises(error, match=match):
        canonical_sphere_dims(3, dims)


def test_one_element_tuple_is_an_int():
    assert canonical_sphere_dims(3, (-1,)) == 2
