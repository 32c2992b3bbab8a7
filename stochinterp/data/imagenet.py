"""ImageNet from a folder tree, and TFDS's own prepared ``imagenet2012``.

``imagenet_folder`` accepts this layout under ``source_dir``::

    train/<class>/<image>          one folder per class (e.g. n01440764/)
    val/<class>/<image>            either the same class folders, or
    val/<image>                    flat, with a labels file (see below)

Images are files ending in .JPEG, .jpg, .jpeg or .png (any case); every
other entry (files with another extension, folders inside a class folder,
hidden ``.name`` entries, special files) is skipped and counted in the log; a
``train/`` class folder with no images keeps its label and is named in a
warning. A broken symbolic link with an image extension, an image or class
folder name that is not valid UTF-8, and images beside class folders (in
``train/``, or in ``val/`` next to its class folders) are errors, raised
before building.

The class list is the sorted list of ``train/`` folder names and the label is
the index in it (for ImageNet this is the usual sorted-synset order, the same
as TFDS ``imagenet2012``). A flat ``val/`` needs one of these files, looked up
in ``source_dir`` and then in ``source_dir/val``:

* ``LOC_val_solution.csv`` (the Kaggle ImageNet layout): a header line, then
  ``ImageId,PredictionString`` rows whose prediction string starts with the
  class name, e.g. ``ILSVRC2012_val_00008726,n02119789 255 142 454 329 ...``;
* ``val_labels.txt``: one ``<file name> <class name>`` pair per line.

File names in a labels file may omit the image extension; the first file
found is read (the others are named in a warning), and an image given two
classes is an error. ``val/`` may be missing
(only ``train`` is then built); ``validation`` is the split name, as in TFDS.

Every image goes through ``transforms.center_crop_adm`` (halve with a box
filter while the short side is at least twice the target, bicubic resize of
the short side to the target, central square) after ``transforms.to_rgb``.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from google.protobuf import json_format

from stochinterp import input_errors
from stochinterp.data import transforms

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt")
PRESET_SIZES = (64, 128, 256)
SPLITS = ("train", "validation")

LAYOUT_HELP = (
    "expected <source_dir>/train/<class>/<image>.JPEG with one folder per "
    "class, and optionally <source_dir>/val/ holding either the same class "
    "folders or flat images plus LOC_val_solution.csv or val_labels.txt "
    "('<file name> <class name>' lines) in <source_dir> or <source_dir>/val"
)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _shown(path: str) -> str:
    """``path`` quoted for a message, bytes that are not UTF-8 as ``\\xff``."""
    return "'" + os.fsencode(path).decode("utf-8", "backslashreplace") + "'"


def _check_utf8(path: str, what: str) -> None:
    # File and class names are stored as text, which must be UTF-8.
    try:
        os.path.basename(path).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"the {what} name {_shown(path)} is not valid UTF-8; file and folder "
            "names must be valid UTF-8 (they are stored as text): rename it"
        ) from None


def _check_not_broken_link(path: str) -> None:
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(
            f"{_shown(path)} is a broken symbolic link (to "
            f"{_shown(os.readlink(path))}, which does not exist) where an image "
            "file was expected: restore its target or remove the link, then "
            "build the dataset again"
        )


def _scan(folder: str) -> tuple[list[str], list[str], list[str]]:
    """The entries of ``folder``: image names, folder names, other paths.

    Images are files with an image extension, folders are directories; both
    lists are sorted names. Everything else (files with another extension,
    special files, hidden ``.name`` entries) is returned as sorted paths.

    Raises:
      ValueError: an image name is not valid UTF-8, or is a broken symbolic
        link.
    """
    images, folders, other = [], [], []
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            other.append(entry.path)
        elif entry.is_dir():
            folders.append(entry.name)
        elif not _is_image(entry.name):
            other.append(entry.path)
        elif entry.is_file():
            _check_utf8(entry.path, "image file")
            images.append(entry.name)
        else:
            _check_not_broken_link(entry.path)
            other.append(entry.path)
    return sorted(images), sorted(folders), sorted(other)


def _class_files(
    root: str, folders: list[str], index: dict[str, int]
) -> tuple[list[tuple[str, int]], list[str]]:
    """Lists the images of the class folders ``root/<name>/`` and the rest.

    Returns:
      The ``(path, label)`` pairs of the images, and the paths of the other
      entries of those folders (nested folders included).
    """
    files, skipped = [], []
    for name in folders:
        folder = os.path.join(root, name)
        images, nested, other = _scan(folder)
        files.extend((os.path.join(folder, image), index[name]) for image in images)
        skipped.extend([os.path.join(folder, n) for n in nested] + other)
    return files, skipped


def _log_skipped(root: str, skipped: list[str]) -> None:
    if skipped:
        logging.warning(
            "Skipped %d entries under %s that are not image files (other "
            "extensions, nested or hidden folders, special files), e.g. %s",
            len(skipped),
            root,
            ", ".join(_shown(path) for path in skipped[:3]),
        )


def _few(root: str, names: list[str]) -> str:
    shown = ", ".join(_shown(os.path.join(root, name)) for name in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def scan_train(source_dir: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Lists the class names and ``(path, label)`` pairs of ``train/``.

    Raises:
      FileNotFoundError: ``source_dir`` or ``source_dir/train`` is missing.
      ValueError: no class folder or no image was found, images lie outside
        the class folders, a name is not valid UTF-8 or an image name is a
        broken symbolic link.
    """
    if not os.path.isdir(source_dir):
        raise FileNotFoundError(
            f"ImageNet source directory {source_dir!r} does not exist; set "
            f"data.source_dir to the folder that holds train/ ({LAYOUT_HELP})"
        )
    train = os.path.join(source_dir, "train")
    if not os.path.isdir(train):
        raise FileNotFoundError(
            f"no train/ folder in {source_dir!r} (found: "
            f"{sorted(os.listdir(source_dir))[:10]}); {LAYOUT_HELP}"
        )
    loose, classes, skipped = _scan(train)
    if loose:
        raise ValueError(
            f"{train!r} holds images outside the class folders "
            f"({_few(train, loose)}); train/ must hold one folder per class "
            f"with the images inside: move them into their class folders "
            f"({LAYOUT_HELP})"
        )
    if not classes:
        raise ValueError(f"{train!r} holds no class folders; {LAYOUT_HELP}")
    for name in classes:
        _check_utf8(os.path.join(train, name), "class folder")

    index = {name: label for label, name in enumerate(classes)}
    files, in_classes = _class_files(train, classes, index)
    if not files:
        raise ValueError(
            f"the class folders of {train!r} hold no image files "
            f"({', '.join(IMAGE_EXTENSIONS)}); {LAYOUT_HELP}"
        )
    _log_skipped(train, skipped + in_classes)
    labelled = {label for _, label in files}
    empty = [name for name in classes if index[name] not in labelled]
    if empty:
        logging.warning(
            "%d of the %d class folders under %s hold no images (%s): their "
            "classes keep their labels but get no training examples",
            len(empty),
            len(classes),
            train,
            _few(train, empty),
        )
    return classes, files


def _find_val_labels(source_dir: str) -> str | None:
    """The first labels file found (``source_dir`` first, then ``val/``);
    logs which it is, and warns of others that are not read."""
    found = [
        os.path.join(folder, name)
        for folder in (source_dir, os.path.join(source_dir, "val"))
        for name in VAL_LABEL_FILES
        if os.path.isfile(os.path.join(folder, name))
    ]
    if not found:
        return None
    logging.info("Validation labels from %s", found[0])
    if len(found) > 1:
        logging.warning(
            "Validation labels are read from %s only; not read: %s",
            found[0],
            ", ".join(found[1:]),
        )
    return found[0]


def _label_key(name: str) -> str:
    """A validation image's name without its image extension, if it has one."""
    stem, extension = os.path.splitext(name)
    return stem if extension.lower() in IMAGE_EXTENSIONS else name


def read_val_labels(path: str) -> dict[str, str]:
    """Reads a validation labels file into ``{file name: class name}``.

    File names are kept without an image extension (``.JPEG``, ``.jpg``,
    ``.jpeg``, ``.png``, any case) when they have one. A byte order mark at
    the start of the file is skipped.

    Raises:
      ValueError: a line does not parse, or an image is given two classes; the
        message gives file and line.
    """
    labels, lines = {}, {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        if path.endswith(".csv"):
            rows = list(csv.reader(f))[1:]
            first_line = 2
        else:
            rows = [line.split() for line in f]
            first_line = 1
        for number, row in enumerate(rows, start=first_line):
            if not row:
                continue
            image = row[0]
            rest = row[1].split() if path.endswith(".csv") and len(row) > 1 else row[1:]
            if not rest:
                raise ValueError(
                    f"{path}, line {number}: no class name after {image!r}; "
                    "expected '<file name> <class name>' (or ImageId,PredictionString "
                    "rows in LOC_val_solution.csv)"
                )
            key = _label_key(image)
            if labels.get(key, rest[0]) != rest[0]:
                raise ValueError(
                    f"{path}, line {number}: {image!r} has the class {rest[0]!r}, "
                    f"but line {lines[key]} gives it {labels[key]!r}; keep one"
                )
            labels[key], lines[key] = rest[0], lines.get(key, number)
    return labels


def scan_validation(source_dir: str, classes: list[str]) -> list[tuple[str, int]]:
    """Lists the ``(path, label)`` pairs of ``val/`` (empty if it is missing).

    Raises:
      ValueError: an unknown class folder or label, an image without a label,
        a flat ``val/`` without a labels file, class folders and flat images
        side by side, a name that is not valid UTF-8, an image name that is a
        broken symbolic link, or no image at all.
    """
    val = os.path.join(source_dir, "val")
    if not os.path.isdir(val):
        logging.warning("No val/ folder in %s: building the train split only", val)
        return []
    index = {name: i for i, name in enumerate(classes)}
    flat, folders, skipped = _scan(val)
    if flat and folders:
        raise ValueError(
            f"{val!r} holds both class folders ({_few(val, folders)}) and "
            f"images outside them ({_few(val, flat)}); val/ must be either "
            "class folders or flat images with a labels file, not both: move "
            "the images into their class folders, or the class folders' "
            "images up into val/ and into the labels file"
        )
    if folders:
        for name in folders:
            _check_utf8(os.path.join(val, name), "class folder")
        unknown = sorted(set(folders) - set(index))
        if unknown:
            raise ValueError(
                f"class folders {unknown[:5]} in {val!r} have no match in train/; "
                "validation classes must be a subset of the training classes"
            )
        files, in_classes = _class_files(val, folders, index)
        skipped += in_classes
    else:
        files = _flat_validation(source_dir, val, flat, index)
        skipped = [p for p in skipped if os.path.basename(p) not in VAL_LABEL_FILES]
    if not files:
        raise ValueError(f"{val!r} holds no image files; {LAYOUT_HELP}")
    _log_skipped(val, skipped)
    return files


def _flat_validation(
    source_dir: str, val: str, images: list[str], index: dict[str, int]
) -> list[tuple[str, int]]:
    if not images:
        return []
    labels_path = _find_val_labels(source_dir)
    if labels_path is None:
        raise FileNotFoundError(
            f"{val!r} holds images but no class folders and no labels file; put "
            f"one of {VAL_LABEL_FILES} in {source_dir!r} or {val!r} ({LAYOUT_HELP})"
        )
    labels = read_val_labels(labels_path)
    files = []
    for image in images:
        name = labels.get(_label_key(image))
        if name is None:
            raise ValueError(
                f"validation image {os.path.join(val, image)!r} has no entry in "
                f"{labels_path!r}; add its label or remove the image"
            )
        if name not in index:
            raise ValueError(
                f"{labels_path!r} gives {image!r} the class {name!r}, which is not "
                "a folder of train/"
            )
        files.append((os.path.join(val, image), index[name]))
    return files


@dataclasses.dataclass
class ImageSizeConfig(tfds.core.BuilderConfig):
    """Side of the stored square images."""

    image_size: int = 64


def size_config(image_size: int) -> ImageSizeConfig:
    """The builder config for ``image_size`` (presets 64, 128, 256; any size)."""
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    return ImageSizeConfig(
        name=str(image_size),
        image_size=image_size,
        description=f"ADM centre crops of {image_size}x{image_size}",
    )


class ImagenetFolder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of ``imagenet_folder/<size>`` from a folder tree.

    Args (constructor, besides TFDS's ``config`` and ``data_dir``):
      source_dir: the folder holding ``train/`` (and ``val/``); needed only to
        build, not to read a built copy.
      num_threads: threads decoding images while building.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [size_config(size) for size in PRESET_SIZES]

    def __init__(
        self, *, source_dir: str | None = None, num_threads: int | None = None, **kwargs
    ):
        self._source_dir = source_dir
        self._num_threads = num_threads or min(16, os.cpu_count() or 1)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(size, size, 3), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._source_dir is None:
            raise ValueError(
                f"imagenet_folder/{self.builder_config.name} is not built in "
                f"{self.data_dir!r} and no source_dir was given; set data.source_dir "
                f"({LAYOUT_HELP})"
            )
        source_dir = os.path.abspath(os.path.expanduser(self._source_dir))
        classes, train = scan_train(source_dir)
        validation = scan_validation(source_dir, classes)
        self.info.features["label"].names = classes
        self.info.metadata["source_dir"] = source_dir
        splits = {
            "train": self._generate_examples(train, os.path.join(source_dir, "train"))
        }
        if validation:
            val = os.path.join(source_dir, "val")
            splits["validation"] = self._generate_examples(validation, val)
        return splits

    def _generate_examples(self, files: list[tuple[str, int]], root: str):
        size = self.builder_config.image_size
        chunk = 64 * self._num_threads
        with concurrent.futures.ThreadPoolExecutor(self._num_threads) as pool:
            for start in range(0, len(files), chunk):
                part = files[start : start + chunk]
                images = pool.map(
                    lambda item: transforms.decode_image_file(item[0], size), part
                )
                for (path, label), image in zip(part, images, strict=True):
                    name = os.path.relpath(path, root)
                    yield name, {"image": image, "label": label, "file_name": name}


def imagenet_folder_builder(
    image_size: int, data_dir: str, source_dir: str | None
) -> ImagenetFolder:
    """An ``ImagenetFolder`` builder (not yet built) for ``image_size``.

    Raises:
      ValueError: a built copy in ``data_dir`` came from another source folder.
    """
    config = size_config(image_size)
    if image_size in PRESET_SIZES:
        config = config.name
    builder = ImagenetFolder(config=config, data_dir=data_dir, source_dir=source_dir)
    if builder.is_prepared() and source_dir:
        built_from = builder.info.metadata.get("source_dir")
        wanted = os.path.abspath(os.path.expanduser(source_dir))
        if built_from and built_from != wanted:
            raise ValueError(
                f"{builder.data_dir!r} was built from {built_from!r}, not from "
                f"source_dir {wanted!r}; use another data_dir or delete that folder"
            )
    return builder


_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def imagenet2012_builder(data_dir: str) -> tfds.core.DatasetBuilder:
    """Opens TFDS's ``imagenet2012`` prepared as array_record in ``data_dir``.

    Raises:
      FileNotFoundError: no prepared copy; the message says how to make one.
      ValueError: the prepared copy is not in the array_record format, or its
        metadata cannot be read (an input error, ``stochinterp.input_errors``).
      FileNotFoundError: a split lacks some of its files (an input error).
    """
    root = os.path.join(data_dir, "imagenet2012")
    versions = []
    if os.path.isdir(root):
        versions = sorted(
            (tuple(int(p) for p in name.split(".")), name)
            for name in os.listdir(root)
            if _VERSION.match(name)
            and os.path.isfile(os.path.join(root, name, "dataset_info.json"))
        )
    if not versions:
        raise FileNotFoundError(
            f"TFDS imagenet2012 is not prepared in {root!r} (expected a version "
            "folder such as 5.1.0/ with dataset_info.json and *.array_record-* "
            "files). Prepare it once where TensorFlow is installed, with the "
            "ILSVRC2012 tar files in a manual dir: `tfds build imagenet2012 "
            f"--data_dir={data_dir} --manual_dir=<tars> "
            "--file_format=array_record`, and point data.data_dir at it; or use "
            "data.name='imagenet_folder' with data.source_dir set to a folder "
            "tree of JPEGs"
        )
    builder = _open_prepared(os.path.join(root, versions[-1][1]), data_dir)
    file_format = builder.info.file_format
    if file_format is None or file_format.value != "array_record":
        raise ValueError(
            f"imagenet2012 in {builder.data_dir!r} is stored as {file_format}, "
            "which random access cannot read; convert it with `tfds "
            "convert_format --dataset_dir=... --out_file_format=array_record` "
            "or prepare it again with --file_format=array_record"
        )
    for split, info in builder.info.splits.items():
        missing = [str(path) for path in info.filepaths if not os.path.isfile(path)]
        if missing:
            raise input_errors.mark(
                FileNotFoundError(
                    f"imagenet2012 in {builder.data_dir!r} lacks {len(missing)} of "
                    f"the {info.num_shards} files of its {split!r} split, first "
                    f"{missing[0]!r}: prepare it again or point data.data_dir at "
                    "a complete copy"
                )
            )
    return builder


def _open_prepared(folder: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """``tfds.builder_from_directory``, with a damaged metadata file named."""
    try:
        return tfds.builder_from_directory(folder)
    except (json_format.ParseError, ValueError, KeyError, TypeError) as err:
        info = os.path.join(folder, "dataset_info.json")
        detail = " ".join(str(err).split())[:200]
        raise input_errors.mark(
            ValueError(
                f"{info!r} is not a readable TFDS dataset_info.json ({detail}; "
                "features.json beside it is read too): prepare imagenet2012 "
                "again (`tfds build imagenet2012 "
                f"--data_dir={data_dir} --manual_dir=<tars> "
                "--file_format=array_record`) or point data.data_dir at another "
                "copy"
            )
        ) from err
