"""ImageNet folder conversion: layout, ADM crop, colour modes and clear errors."""

import io
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict
from PIL import Image

from stochinterp import data, input_errors
from stochinterp.data import imagenet, transforms

CLASSES = ("n01440764", "n01443537", "n01484850")
# (width, height) of the train images of each class: odd sizes on purpose.
SIZES = ((37, 53), (80, 41), (150, 97))
IMAGE_SIZE = 16


def _random_rgb(rng, width, height):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _make_tree(root, rng):
    """A tiny ImageNet: 3 classes x 3 JPEGs, odd modes, a flat val/ folder."""
    for c, name in enumerate(CLASSES):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for k, (w, h) in enumerate(SIZES):
            Image.fromarray(_random_rgb(rng, w, h)).save(folder / f"{name}_{k}.JPEG")
        (folder / "notes.txt").write_text("not an image")
        del c
    extra = root / "train" / CLASSES[0]
    grey = rng.integers(0, 256, (45, 39), dtype=np.uint8)
    Image.fromarray(grey).save(extra / "grey.JPEG")
    cmyk = rng.integers(0, 256, (42, 50, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(extra / "cmyk.JPEG")
    # ImageNet holds a PNG named .JPEG; this one has an alpha channel.
    rgba = rng.integers(0, 256, (36, 40, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(extra / "rgba.JPEG", format="PNG")
    # A hidden folder (an editor's or a notebook's) is not a class.
    hidden = root / "train" / ".ipynb_checkpoints"
    hidden.mkdir()
    Image.fromarray(_random_rgb(rng, 20, 20)).save(hidden / "stray.JPEG")
    val = root / "val"
    val.mkdir()
    lines = []
    for k, name in enumerate((CLASSES[2], CLASSES[0], CLASSES[1], CLASSES[2])):
        Image.fromarray(_random_rgb(rng, 33 + k, 44)).save(val / f"v_{k}.JPEG")
        lines.append(f"v_{k}.JPEG {name}")
    (val / "val_labels.txt").write_text("\n".join(lines) + "\n")
    return {"grey": grey, "cmyk": extra / "cmyk.JPEG", "rgba": rgba}


def _config(source_dir, data_dir, size=IMAGE_SIZE):
    return ConfigDict(
        {
            "name": "imagenet_folder",
            "image_size": size,
            "data_dir": str(data_dir),
            "source_dir": str(source_dir),
            "random_flip": True,
            "shuffle_seed": 0,
        }
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    originals = _make_tree(root, np.random.default_rng(0))
    config = _config(root, tmp_path_factory.mktemp("tfds"))
    built = data.builder(config)
    records = {}
    for split in ("train", "validation"):
        for record in built.as_data_source(split=split):
            records[(split, record["file_name"].decode())] = record
    return root, config, originals, records


def test_splits_shapes_and_labels(tiny):
    _, config, _, records = tiny
    info = data.dataset_info(config)
    assert info.class_names == CLASSES
    assert info.split_sizes == {"train": 12, "validation": 4}
    assert info.channels == 3 and info.eval_split == "validation"
    for (split, name), record in records.items():
        assert record["image"].shape == (16, 16, 3)
        assert record["image"].dtype == np.uint8
        if split == "train":
            assert record["label"] == CLASSES.index(name.split("/")[0])
    val_labels = {n: int(r["label"]) for (s, n), r in records.items() if s != "train"}
    assert val_labels == {"v_0.JPEG": 2, "v_1.JPEG": 0, "v_2.JPEG": 1, "v_3.JPEG": 2}


def test_crop_matches_hand_computed_pil_steps(tiny):
    root, _, _, records = tiny
    name = CLASSES[1]
    # 80x41 at 16: halve once (box) to 40x20, bicubic to 32x16, columns 8:24.
    with Image.open(root / "train" / name / f"{name}_1.JPEG") as image:
        small = image.convert("RGB").resize((40, 20), Image.Resampling.BOX)
        want = np.asarray(small.resize((32, 16), Image.Resampling.BICUBIC))[:, 8:24]
    got = records[("train", f"{name}/{name}_1.JPEG")]["image"]
    np.testing.assert_array_equal(got, want)
    # 37x53: halve to 18x26, bicubic to 16x23 (23.1 rounded), rows 3:19.
    with Image.open(root / "train" / name / f"{name}_0.JPEG") as image:
        small = image.convert("RGB").resize((18, 26), Image.Resampling.BOX)
        want = np.asarray(small.resize((16, 23), Image.Resampling.BICUBIC))[3:19]
    np.testing.assert_array_equal(
        records[("train", f"{name}/{name}_0.JPEG")]["image"], want
    )


def test_no_halving_below_twice_the_target():
    image = Image.fromarray(np.arange(31 * 50 * 3, dtype=np.uint8).reshape(31, 50, 3))
    want = np.asarray(image.resize((26, 16), Image.Resampling.BICUBIC))[:, 5:21]
    np.testing.assert_array_equal(transforms.center_crop_adm(image, 16), want)


def test_grey_cmyk_and_rgba_become_rgb(tiny):
    _, _, originals, records = tiny
    folder = CLASSES[0]
    grey = records[("train", f"{folder}/grey.JPEG")]["image"]
    assert np.array_equal(grey[..., 0], grey[..., 1])
    assert np.array_equal(grey[..., 0], grey[..., 2])
    assert grey.std() > 10  # the noise survived, not a flat fill
    with Image.open(originals["cmyk"]) as image:
        assert image.mode == "CMYK"
        want = transforms.center_crop_adm(image.convert("RGB"), IMAGE_SIZE)
    np.testing.assert_array_equal(
        records[("train", f"{folder}/cmyk.JPEG")]["image"], want
    )
    # Alpha is dropped: same as cropping the RGB channels alone.
    rgb = Image.fromarray(np.ascontiguousarray(originals["rgba"][..., :3]))
    want = transforms.center_crop_adm(rgb, IMAGE_SIZE)
    np.testing.assert_array_equal(
        records[("train", f"{folder}/rgba.JPEG")]["image"], want
    )


def test_loader_over_the_folder(tiny):
    _, config, _, _ = tiny
    loader = data.make_loader_from_config(config, "train", 4)
    batch = next(loader)
    assert batch["image"].shape == (4, 16, 16, 3)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert set(batch["label"].tolist()) <= {0, 1, 2}
    evaluation = data.eval_examples(config, n=4)
    assert evaluation["image"].shape == (4, 16, 16, 3)
    assert sorted(evaluation["label"].tolist()) == [0, 1, 2, 2]


def test_second_call_reuses_the_build(tiny):
    _, config, _, _ = tiny
    folder = data.builder(config).data_dir
    before = {
        f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)
    }
    data.builder(config)
    after = {
        f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)
    }
    assert before == after


def test_an_empty_source_dir_reads_the_build_and_says_which_once(tiny, caplog):
    root, config, _, records = tiny
    reuse = config.copy_and_resolve_references()
    reuse.source_dir = ""
    with caplog.at_level("INFO", logger="absl"):
        for _ in range(2):
            built = data.builder(reuse)
    lines = [
        r.getMessage()
        for r in caplog.records
        if "source_dir is empty" in r.getMessage()
    ]
    assert lines == [
        f"data.source_dir is empty: reading the dataset built in {built.data_dir} "
        f"from {os.path.abspath(root)}"
    ]
    assert len(built.as_data_source(split="train")) == sum(
        split == "train" for split, _ in records
    )


def test_built_from_another_source_is_refused(tiny, tmp_path):
    _, config, _, _ = tiny
    other = config.copy_and_resolve_references()
    other.source_dir = str(tmp_path)
    with pytest.raises(ValueError, match="was built from"):
        data.builder(other)


def test_kaggle_solution_csv_and_class_folders(tmp_path):
    rng = np.random.default_rng(1)
    for name in CLASSES[:2]:
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(_random_rgb(rng, 20, 20)).save(
            tmp_path / "train" / name / "a.JPEG"
        )
    (tmp_path / "val").mkdir()
    Image.fromarray(_random_rgb(rng, 20, 20)).save(tmp_path / "val" / "ILSVRC_1.JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC_1,{CLASSES[1]} 1 2 3 4 {CLASSES[1]} 5 6 7 8\n"
    )
    classes, _ = imagenet.scan_train(str(tmp_path))
    assert imagenet.scan_validation(str(tmp_path), classes) == [
        (str(tmp_path / "val" / "ILSVRC_1.JPEG"), 1)
    ]
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no labels file"):
        imagenet.scan_validation(str(tmp_path), classes)
    (tmp_path / "val" / "ILSVRC_1.JPEG").unlink()
    (tmp_path / "val" / CLASSES[0]).mkdir()
    Image.fromarray(_random_rgb(rng, 9, 9)).save(
        tmp_path / "val" / CLASSES[0] / "b.png"
    )
    assert imagenet.scan_validation(str(tmp_path), classes) == [
        (str(tmp_path / "val" / CLASSES[0] / "b.png"), 0)
    ]


def test_labels_files_give_line_numbers_of_the_file(tmp_path):
    csv_path = tmp_path / "LOC_val_solution.csv"
    csv_path.write_text("ImageId,PredictionString\nILSVRC_1,n1 1 2 3 4\n")
    assert imagenet.read_val_labels(str(csv_path)) == {"ILSVRC_1": "n1"}
    csv_path.write_text("ImageId,PredictionString\na.JPEG,n1 0 0 1 1\na,n2 0 0 1 1\n")
    with pytest.raises(
        ValueError, match=r"line 3: 'a' has the class 'n2', but line 2 "
    ):
        imagenet.read_val_labels(str(csv_path))
    text = tmp_path / "val_labels.txt"
    text.write_text("img n1\nimg.JPEG n1\nimg.png n2\n")
    with pytest.raises(ValueError, match=r"line 3: 'img.png' has the class 'n2', but "):
        imagenet.read_val_labels(str(text))
    with pytest.raises(ValueError, match="but line 1 gives it 'n1'; keep one"):
        imagenet.read_val_labels(str(text))


def test_missing_and_empty_source_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="source_dir=.*nowhere' is not a folder"):
        data.validate(_config(missing, tmp_path / "tfds"))  # before any work
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"no train/ folder in .*empty.*expected"
    ):
        data.builder(_config(empty, tmp_path / "tfds"))
    (empty / "train" / CLASSES[0]).mkdir(parents=True)
    with pytest.raises(ValueError, match="hold no image files"):
        data.builder(_config(empty, tmp_path / "tfds"))
    config = _config("", tmp_path / "tfds")
    with pytest.raises(ValueError, match="source_dir is empty"):
        data.builder(config)


def test_corrupt_file_names_the_file_and_the_fix(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "src" / "train" / CLASSES[0]
    folder.mkdir(parents=True)
    Image.fromarray(_random_rgb(rng, 30, 30)).save(folder / "good.JPEG")
    (folder / "bad.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match=r"bad\.JPEG.*remove it, or replace it"):
        data.builder(_config(tmp_path / "src", tmp_path / "tfds"))
    # A truncated JPEG fails too, naming the file.
    encoded = (folder / "good.JPEG").read_bytes()
    (folder / "bad.JPEG").write_bytes(encoded[: len(encoded) // 2])
    with pytest.raises(ValueError, match=r"bad\.JPEG"):
        data.builder(_config(tmp_path / "src", tmp_path / "tfds"))


@pytest.mark.parametrize("width, height, size", [(900, 50, 64), (40, 700, 32)])
def test_a_thin_strip_is_cropped_within_1_of_the_full_resize(width, height, size):
    rng = np.random.default_rng(3)
    image = Image.fromarray(_random_rgb(rng, width, height))
    out = transforms.center_crop_adm(image, size)
    scale = size / min(width, height)
    full_w, full_h = round(width * scale), round(height * scale)
    assert max(full_w, full_h) > 8 * size  # the strip path is taken
    full = np.asarray(image.resize((full_w, full_h), Image.Resampling.BICUBIC))
    top, left = (full_h - size) // 2, (full_w - size) // 2
    want = full[top : top + size, left : left + size].astype(int)
    assert out.shape == (size, size, 3)
    assert np.abs(out.astype(int) - want).max() <= 1


def test_an_image_over_pils_pixel_limit_is_named(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 2500 > 2 x 100
    with pytest.raises(ValueError, match=r"huge\.png"):
        transforms.decode_image_file(path, 8)


@pytest.mark.parametrize(
    "mode, values, want",
    [
        ("I", [0, 128, 255], [0, 128, 255]),  # 8-bit values in a 32-bit image
        ("I", [0, 32896, 65535], [0, 128, 255]),  # 16-bit values
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # [0, 1] floats
        ("F", [0.0, 128.0, 300.0], [0, 128, 255]),  # [0, 255] floats, clipped
    ],
)
def test_32_bit_and_float_grey_images_are_rescaled(mode, values, want):
    dtype = np.int32 if mode == "I" else np.float32
    image = Image.fromarray(np.asarray([values], dtype), mode=mode)
    rgb = np.asarray(transforms.to_rgb(image))
    np.testing.assert_array_equal(rgb[0, :, 0], want)
    assert rgb.shape == (1, 3, 3) and (rgb[..., 0] == rgb[..., 2]).all()


def test_imagenet2012_not_prepared(tmp_path):
    config = ConfigDict(
        {"name": "imagenet2012", "image_size": 64, "data_dir": str(tmp_path)}
    )
    with pytest.raises(FileNotFoundError) as raised:
        data.builder(config)
    message = str(raised.value)
    assert str(tmp_path / "imagenet2012") in message
    assert "tfds build imagenet2012" in message and "array_record" in message
    assert "imagenet_folder" in message


def _jpeg_bytes(seed):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(_random_rgb(rng, 70, 50)).save(buffer, format="JPEG")
    return buffer.getvalue()


class _StoredJpegs(tfds.core.GeneratorBasedBuilder):
    """Stands in for a prepared imagenet2012: JPEG bytes, label, file name."""

    VERSION = tfds.core.Version("5.1.0")

    def _info(self):
        features = {
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": tfds.features.ClassLabel(num_classes=3),
            "file_name": tfds.features.Text(),
        }
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features)
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples() for s in ("train", "validation")}

    def _generate_examples(self):
        for i in range(5):
            image = _jpeg_bytes(i)[: 100 if i == self.damaged else None]
            yield i, {"image": image, "label": i % 3, "file_name": f"{i}.JPEG"}

    damaged = None


def _prepared_imagenet2012(tmp_path, damaged=None):
    made = _StoredJpegs(data_dir=str(tmp_path / "build"), file_format="array_record")
    made.damaged = damaged
    made.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    (tmp_path / "imagenet2012").mkdir()
    shutil.move(made.data_dir, tmp_path / "imagenet2012" / "5.1.0")
    return ConfigDict(
        {"name": "imagenet2012", "image_size": 16, "data_dir": str(tmp_path)}
    )


def test_imagenet2012_prepared_copy_is_cropped_on_the_fly(tmp_path):
    config = _prepared_imagenet2012(tmp_path)
    # Older versions beside it (damaged ones) are not read: the newest is.
    for old in ("5.0.0", "5.0.10"):
        (tmp_path / "imagenet2012" / old).mkdir()
        (tmp_path / "imagenet2012" / old / "dataset_info.json").write_text("{")
    built = data.builder(config)
    assert built.data_dir.endswith("5.1.0")
    info = data.dataset_info(config)
    assert info.split_sizes == {"train": 5, "validation": 5}
    source, _ = data.data_source(config, "validation")
    first = int(source[0]["file_name"].decode().split(".")[0])
    with Image.open(io.BytesIO(_jpeg_bytes(first))) as image:
        want = transforms.to_unit_range(transforms.center_crop_adm(image, 16))
    got = data.eval_examples(config, n=2)
    assert got["image"].shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(got["image"][0], want)
    assert got["label"][0] == first % 3


def test_a_damaged_imagenet2012_copy_is_named_in_one_line(tmp_path):
    config = _prepared_imagenet2012(tmp_path, damaged=3)  # a truncated JPEG
    source, _ = data.data_source(config, "validation")
    where = [int(source[i]["file_name"].decode()[0]) for i in range(5)].index(3)
    if where:
        data.eval_examples(config, n=where)  # the images before it decode
    with pytest.raises(ValueError) as raised:
        data.eval_examples(config, n=1, start=where)
    message = str(raised.value)
    assert input_errors.is_input_error(raised.value) and "\n" not in message
    assert message.startswith("cannot decode stored image '3.JPEG'")
    assert message.endswith(
        "in the prepared imagenet2012: prepare it again or point data.data_dir "
        "at a good copy"
    )

    # A split without its files is named when the dataset is opened.
    folder = tmp_path / "imagenet2012" / "5.1.0"
    shard = next(folder.glob("*validation.array_record*"))
    shard.unlink()
    with pytest.raises(FileNotFoundError) as raised:
        data.dataset_info(config)
    assert input_errors.is_input_error(raised.value)
    assert str(raised.value) == (
        f"imagenet2012 in '{folder}' lacks 1 of the 1 files of its 'validation' "
        f"split, first '{shard}': prepare it again or point data.data_dir at a "
        "complete copy"
    )


def _two_classes(root, rng):
    for name in CLASSES[:2]:
        (root / "train" / name).mkdir(parents=True)
        Image.fromarray(_random_rgb(rng, 20, 20)).save(root / "train" / name / "a.JPEG")


def test_a_name_that_is_not_utf8_is_named_before_building(tmp_path):
    rng = np.random.default_rng(4)
    _two_classes(tmp_path / "src", rng)
    good = tmp_path / "src" / "train" / CLASSES[0] / "a.JPEG"
    bad = os.fsencode(good.parent) + b"/bad\xff.jpg"
    with open(bad, "wb") as f:
        f.write(good.read_bytes())
    with pytest.raises(ValueError) as raised:
        data.builder(_config(tmp_path / "src", tmp_path / "tfds"))
    want = f"image file name '{good.parent}/bad\\xff.jpg' is not valid UTF-8"
    assert want in str(raised.value)
    assert "\n" not in str(raised.value)
    os.remove(bad)
    os.mkdir(os.fsencode(tmp_path / "src" / "train") + b"/n\xfe")
    with pytest.raises(ValueError, match=r"class folder name '.*/train/n\\xfe' is"):
        imagenet.scan_train(str(tmp_path / "src"))


def test_val_with_class_folders_and_flat_images_is_refused(tmp_path):
    rng = np.random.default_rng(5)
    _two_classes(tmp_path, rng)
    val = tmp_path / "val"
    (val / CLASSES[0]).mkdir(parents=True)
    Image.fromarray(_random_rgb(rng, 20, 20)).save(val / CLASSES[0] / "val_0.JPEG")
    for k in range(1, 4):
        Image.fromarray(_random_rgb(rng, 20, 20)).save(val / f"val_{k}.JPEG")
    (val / "val_labels.txt").write_text(
        "".join(f"val_{k}.JPEG {CLASSES[k % 2]}\n" for k in range(4))
    )
    with pytest.raises(ValueError) as raised:
        imagenet.scan_validation(str(tmp_path), list(CLASSES[:2]))
    message = str(raised.value)
    assert "either class folders or flat images with a labels file" in message
    assert f"'{val / CLASSES[0]}'" in message and f"'{val / 'val_3.JPEG'}'" in message


def test_val_labels_read_with_a_byte_order_mark_dotted_names_and_conflicts(
    tmp_path, caplog
):
    rng = np.random.default_rng(8)
    _two_classes(tmp_path, rng)
    val = tmp_path / "val"
    val.mkdir()
    for name in ("img.v2.JPEG", "plain.png", "b.jpg"):
        Image.fromarray(_random_rgb(rng, 20, 20)).save(val / name)
    # Names with or without their image extension (even another one), a
    # name holding a dot, a byte order mark as Windows editors write it.
    lines = [f"img.v2 {CLASSES[1]}", f"plain.JPEG {CLASSES[0]}", f"b.jpg {CLASSES[1]}"]
    labels = tmp_path / "val_labels.txt"
    labels.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    (val / "val_labels.txt").write_text("ignored n00000000\n")
    with caplog.at_level("INFO", logger="absl"):
        files = imagenet.scan_validation(str(tmp_path), list(CLASSES[:2]))
    assert sorted(files) == [
        (str(val / "b.jpg"), 1),
        (str(val / "img.v2.JPEG"), 1),
        (str(val / "plain.png"), 0),
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert f"Validation labels from {labels}" in messages
    assert (
        f"Validation labels are read from {labels} only; not read: "
        f"{val / 'val_labels.txt'}"
    ) in messages

    # The same image given two classes is refused; the same class twice is not.
    labels.write_text(
        "\n".join([*lines, f"b {CLASSES[1]}", f"img.v2.JPEG {CLASSES[0]}"])
    )
    with pytest.raises(ValueError) as raised:
        imagenet.scan_validation(str(tmp_path), list(CLASSES[:2]))
    assert str(raised.value) == (
        f"{labels}, line 5: 'img.v2.JPEG' has the class '{CLASSES[0]}', but line 1 "
        f"gives it '{CLASSES[1]}'; keep one"
    )


def test_skipped_entries_in_val_class_folders_are_counted(tmp_path, caplog):
    rng = np.random.default_rng(6)
    _two_classes(tmp_path, rng)
    folder = tmp_path / "val" / CLASSES[1]
    (folder / "nested.jpg").mkdir(parents=True)
    Image.fromarray(_random_rgb(rng, 20, 20)).save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    with caplog.at_level("WARNING", logger="absl"):
        files = imagenet.scan_validation(str(tmp_path), list(CLASSES[:2]))
    assert files == [(str(folder / "b.png"), 1)]
    [line] = [r.getMessage() for r in caplog.records if "Skipped" in r.getMessage()]
    assert line.startswith(f"Skipped 2 entries under {tmp_path / 'val'} ")


def test_every_skipped_train_entry_is_counted_and_broken_links_refused(
    tmp_path, caplog
):
    rng = np.random.default_rng(7)
    _two_classes(tmp_path, rng)
    train = tmp_path / "train"
    folder = train / CLASSES[0]
    (folder / "folder.jpg").mkdir()  # a folder is not an image
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")
    os.symlink(tmp_path / "gone.txt", folder / "dangling.txt")
    (train / "README").write_text("about this tree")
    with caplog.at_level("WARNING", logger="absl"):
        _, files = imagenet.scan_train(str(tmp_path))
    assert len(files) == 2
    [line] = [r.getMessage() for r in caplog.records if "Skipped" in r.getMessage()]
    assert line.startswith(f"Skipped 5 entries under {train} ")

    os.symlink(tmp_path / "gone.jpg", folder / "dangling.jpg")
    with pytest.raises(ValueError, match=r"dangling\.jpg' is a broken symbolic link"):
        imagenet.scan_train(str(tmp_path))
    os.remove(folder / "dangling.jpg")
    Image.fromarray(_random_rgb(rng, 20, 20)).save(train / "loose.JPEG")
    with pytest.raises(ValueError, match=r"images outside the class folders .*loose"):
        imagenet.scan_train(str(tmp_path))


@pytest.mark.parametrize("content", ["{garbage", "{}"])
def test_imagenet2012_with_damaged_dataset_info_is_an_input_error(tmp_path, content):
    folder = tmp_path / "imagenet2012" / "5.1.0"
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text(content)
    config = ConfigDict(
        {"name": "imagenet2012", "image_size": 64, "data_dir": str(tmp_path)}
    )
    with pytest.raises(ValueError) as raised:
        data.builder(config)
    message = str(raised.value)
    want = f"'{folder / 'dataset_info.json'}' is not a readable TFDS dataset_info"
    assert message.startswith(want)
    assert "tfds build imagenet2012" in message and "\n" not in message
    assert input_errors.is_input_error(raised.value)


def test_empty_train_class_folders_are_named_in_a_warning(tmp_path, caplog):
    rng = np.random.default_rng(8)
    _two_classes(tmp_path, rng)
    train = tmp_path / "train"
    (train / "n00000000").mkdir()  # sorts first: label 0, no images
    with caplog.at_level("WARNING", logger="absl"):
        classes, files = imagenet.scan_train(str(tmp_path))
    assert classes == ["n00000000", *CLASSES[:2]]
    assert sorted({label for _, label in files}) == [1, 2]
    [line] = [
        r.getMessage() for r in caplog.records if "hold no images" in r.getMessage()
    ]
    assert line.startswith(f"1 of the 3 class folders under {train} hold no images (")
    assert str(train / "n00000000") in line
