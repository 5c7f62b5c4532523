"""The embedded detection set (``qat.app.detection_data``): deterministic canvases of the
bundled digits with tight boxes, disjoint digit images in train and val, GluonCV's label
format (its transforms take it)."""
import numpy as np
import pytest
from gluoncv.data.transforms import presets

from qat.app.detection_data import CLASSES, DigitsDetection
from qat.errors import UserError


def test_deterministic_and_random_access():
    a, b = DigitsDetection('train', count=20, seed=3), DigitsDetection('train', count=20, seed=3)
    for i in (7, 0, 19):  # any order gives the same canvas
        image_a, label_a, used_a = a.render(i)
        image_b, label_b, used_b = b.render(i)
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(label_a, label_b)
        assert used_a == used_b
    other = DigitsDetection('train', count=20, seed=4).render(7)[0]
    assert not np.array_equal(other, a.render(7)[0])
    assert not np.array_equal(a.render(1)[0], a.render(2)[0])


def test_boxes_are_tight_around_the_ink():
    data = DigitsDetection('val', count=30, size=64, max_objects=4, seed=1)
    counts = []
    for i in range(len(data)):
        image, label, used = data.render(i)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert 1 <= len(label) <= 4 and len(used) == len(label)
        counts.append(len(label))
        x0, y0, x1, y1 = label[:, :4].T
        assert np.all((0 <= x0) & (x0 < x1) & (x1 <= 64) & (0 <= y0) & (y0 < y1) & (y1 <= 64))
        assert set(label[:, 4].astype(int)) <= set(range(10)) and not label[:, 5].any()
        outside = np.ones((64, 64), bool)
        for box in label[:, :4].astype(int):
            outside[box[1]:box[3], box[0]:box[2]] = False
            assert image[box[1]:box[3], box[0]:box[2]].max() > 100  # ink inside
        assert image.max(axis=2)[outside].max() < 0.6 * 255  # faint glyph edges at most
    assert len(set(counts)) > 1  # one to several objects per image


def test_train_and_val_use_disjoint_digit_images():
    train, val = DigitsDetection('train', count=200), DigitsDetection('val', count=100)
    assert not set(train.sources) & set(val.sources)
    drawn = {s for i in range(len(val)) for s in val.render(i)[2]}
    assert drawn <= set(val.sources)
    assert abs(len(val.sources) / (len(val.sources) + len(train.sources)) - 0.2) < 0.01


def test_gluoncv_transform_and_classes():
    data = DigitsDetection('train', count=4, size=64)
    assert data.classes == CLASSES
    image, label = data[0]
    x, y = presets.ssd.SSDDefaultValTransform(64, 64)(image, label)
    assert x.shape == (3, 64, 64) and y.shape == label.shape
    np.testing.assert_allclose(y[:, :4], label[:, :4], atol=1e-3)


@pytest.mark.parametrize('kwargs', [{'split': 'test'}, {'min_scale': 40, 'max_scale': 30},
                                    {'max_scale': 80}, {'max_objects': 0}])
def test_bad_arguments_are_one_error(kwargs):
    with pytest.raises(UserError, match='digits detection'):
        DigitsDetection(**kwargs)
