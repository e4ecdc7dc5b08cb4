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


def _png(path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def test_imagefolder_skips_dot_names_and_counts_them(tmp_path, caplog):
    """macOS copies carry ._x.png (AppleDouble) and .DS_Store; hidden folders are metadata too."""
    for cls in ("cat", "dog"):
        for i in range(2):
            _png(tmp_path / cls / f"{i}.png", seed=i)
            (tmp_path / cls / f"._{i}.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # not an image
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "._cat").write_bytes(b"\x00\x05\x16\x07")
    _png(tmp_path / ".hidden-class" / "0.png")  # a class folder nobody meant
    _png(tmp_path / "dog" / ".thumbs" / "0.png")  # hidden subfolder: not entered
    (tmp_path / "dog" / ".thumbs" / "1.png").write_bytes(b"junk")
    _png(tmp_path / "dog" / "sub" / "2.png")  # a visible subfolder still counts
    (tmp_path / "dog" / "sub" / ".DS_Store").write_bytes(b"junk")
    with caplog.at_level("INFO", logger="jas_prune"):
        src = build_source("imagefolder", root=str(tmp_path), probe_fraction=0.5)
    assert src.class_names == ["cat", "dog"]
    assert sorted(s.id for s in src.samples) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png", "dog/sub/2.png"]
    lines = [r.getMessage() for r in caplog.records if r.name == "jas_prune" and "hidden" in r.getMessage()]
    # root: .DS_Store, ._cat, .hidden-class; cat: ._0.png, ._1.png; dog: ._0.png, ._1.png, .thumbs, sub/.DS_Store
    assert lines == [f"data.root: skipped 9 hidden entries (names starting with '.', e.g. .DS_Store) in {tmp_path}"]


def test_imagefolder_without_dot_names_logs_nothing(tmp_path, caplog):
    _png(tmp_path / "cat" / "0.png")
    _png(tmp_path / "cat" / "1.png")
    with caplog.at_level("INFO", logger="jas_prune"):
        build_source("imagefolder", root=str(tmp_path))
    assert not [r for r in caplog.records if "hidden" in r.getMessage()]


def test_imagefolder_still_refuses_what_is_not_hidden(tmp_path):
    """Only dot names are skipped: a broken visible image stops the run naming it."""
    _png(tmp_path / "cat" / "0.png")
    (tmp_path / "cat" / "._0.png").write_bytes(b"AppleDouble")
    (tmp_path / "cat" / "broken.png").write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError) as info:
        build_source("imagefolder", root=str(tmp_path))
    assert str(info.value) == (f"data.root: cannot read image {tmp_path / 'cat' / 'broken.png'}: "
                               "not an image file (Pillow cannot identify its format)")
    (tmp_path / "cat" / "broken.png").unlink()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "._0.png").write_bytes(b"AppleDouble")  # only metadata: no images
    with pytest.raises(DataError, match=r"^data.root: class folder 'dog' in .* has no images$"):
        build_source("imagefolder", root=str(tmp_path))
