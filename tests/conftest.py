"""Shared fixtures: small data sets that the tests make (images on disk in the layouts the
loaders read). Plain helper functions and small networks are in ``tests/helpers.py``."""
import cv2
import numpy as np
import pytest

from tests.helpers import random_image


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """A folder of 10 generated color images of various sizes, and a list file naming them
    (relative to the list's folder)."""
    folder = tmp_path_factory.mktemp('images')
    rs = np.random.RandomState(0)
    names = []
    for i in range(10):
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        cv2.imwrite(str(folder / name), rs.randint(0, 256, (18 + i, 22, 3)).astype(np.uint8))
        names.append(name)
    (folder / 'list.txt').write_text('\n'.join(names) + '\n')
    return folder


@pytest.fixture
def image_folder(tmp_path):
    """root/{train,val}/{cat,dog}/*.png|jpg written with cv2 (BGR on disk)."""
    rgb = {}
    for split, count in (('train', 3), ('val', 2)):
        for label, name in enumerate(('cat', 'dog')):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                img = random_image(10, 12, hash((split, name, i)) % 1000)
                path = str(folder / f'{i}.png')
                cv2.imwrite(path, img[:, :, ::-1])
                rgb[path] = (img, label)
            cv2.imwrite(str(folder / 'lossy.jpg'), random_image(10, 12, 7))
    return tmp_path, rgb
