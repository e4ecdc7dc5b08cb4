import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from jas_prune import shapes
from jas_prune.data import build_source, make_loader, partition, write_shapes_split
from jas_prune.errors import DataError


def test_shapes_classes_and_names():
    assert shapes.NUM_CLASSES >= 48
    assert len(set(shapes.CLASS_NAMES)) == shapes.NUM_CLASSES
    folders = shapes.class_folder_names()
    assert sorted(folders) == folders
    assert folders[0].startswith("00-") and folders[0].endswith(shapes.CLASS_NAMES[0])


def test_shapes_deterministic_bytes():
    a, la = shapes.render(3, "eval", 17)
    b, lb = shapes.render(3, "eval", 17)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert a.tobytes() == b.tobytes() and la == lb == 17 % shapes.NUM_CLASSES
    assert shapes.render(4, "eval", 17)[0].tobytes() != a.tobytes()
    assert shapes.render(3, "train", 17)[0].tobytes() != a.tobytes()
    # a pinned digest: catches any change of the renderer (which would silently change every split)
    digest = hashlib.sha256(shapes.render_batch(0, "eval", range(8))[0].tobytes()).hexdigest()
    assert digest == PINNED_DIGEST


PINNED_DIGEST = "e6e3cc23783956867803ab04ef2b3e5f5057f1f2fc9165c28e444c29abbffce1"


def test_shapes_object_has_its_class_colour():
    """The main object's colour dominates the saturated pixels (the label is visible in the image)."""
    hits = 0
    for i in range(48):
        img, label = shapes.render(0, "eval", i)
        colour = np.asarray(list(shapes.COLOURS.values())[label // len(shapes.SHAPES)]) * 255
        px = img.reshape(-1, 3).astype(float)
        hits += (np.linalg.norm(px - colour, axis=1) < 60).sum() >= 20
    assert hits >= 46


def test_partition_properties():
    labels = [i % 5 for i in range(5 * 10)] + [5, 5, 5]
    probe, test = partition(labels, 0.8, seed=1)
    assert not set(probe) & set(test)
    assert sorted(probe + test) == list(range(len(labels)))
    for c in range(5):
        assert sum(labels[i] == c for i in probe) == 8
    assert sum(labels[i] == 5 for i in probe) == 2 and sum(labels[i] == 5 for i in test) == 1
    assert partition(labels, 0.8, seed=1) == (probe, test)
    assert partition(labels, 0.8, seed=2) != (probe, test)


def test_shapes_source_partition():
    src = build_source("shapes", seed=0, probe_fraction=0.75, images_per_class=8)
    assert src.num_classes == 48 and len(src.samples) == 8 * 48
    assert len(src.probe) == 6 * 48 and len(src.test) == 2 * 48
    assert len(src.subset("test", classes=[0, 1])) == 4


def test_write_shapes_split_matches_recipe_partition(tmp_path):
    n = write_shapes_split("test", tmp_path, seed=2, probe_fraction=0.5, images_per_class=4)
    src = build_source("shapes", seed=2, probe_fraction=0.5, images_per_class=4)
    assert n == len(src.test) == 96
    ids = sorted(int(p.stem) for p in tmp_path.rglob("*.png"))
    assert ids == sorted(s.ref for s in src.subset("test"))
    # the PNG pixels are the rendered pixels, in the folder of the label
    s = src.subset("test")[0]
    folder = shapes.class_folder_names()[s.label]
    png = np.asarray(Image.open(tmp_path / folder / f"{s.ref:06d}.png"))
    assert png.tobytes() == shapes.render(2, "eval", s.ref)[0].tobytes()
    # and reading it back as an imagefolder gives the same classes and labels
    back = build_source("imagefolder", root=str(tmp_path), seed=2, probe_fraction=0.5)
    assert back.class_names == list(shapes.CLASS_NAMES)
    assert sorted(x.label for x in back.samples) == sorted(x.label for x in src.subset("test"))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="data.root: directory not found"):
        build_source("imagefolder", root=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no class folders"):
        build_source("imagefolder", root=str(tmp_path))
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="class folder 'cat'.*no images"):
        build_source("imagefolder", root=str(tmp_path))


def test_imagefolder_loader_uses_model_preprocessing(tmp_path, tiny_builtin):
    from jas_prune.data import model_transform

    write_shapes_split("probe", tmp_path, seed=0, probe_fraction=0.5, images_per_class=2)
    src = build_source("imagefolder", root=str(tmp_path), images_per_class=1)
    assert len(src.samples) == 48
    x, y, pos = next(iter(make_loader(src.samples[:3], model_transform(tiny_builtin), batch_size=3)))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
