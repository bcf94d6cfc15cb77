"""Maps from a model's class ids to an evaluation dataset's class ids (``segstream evaluate``).

A map sends each model class id to one dataset class id; model ids it does not list are
"unmapped" (their pixels count as errors: they can never match a ground-truth class).
Built-in maps follow ../shared/data/camvid_segnet_test/README.md; a YAML file gives any other
(format in docs/evaluation.md and in ``load_class_map``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segstream.models.labels import CAMVID_LABELS, CITYSCAPES_LABELS, VOC_LABELS

_YAML_KEYS = {"classes", "map", "ignore", "name"}


class ClassMapError(ValueError):
    """A class map is unknown, malformed, or does not fit the model it is used with."""


@dataclass(frozen=True)
class ClassMap:
    """``mapping``: model class id -> dataset class id (index into ``classes``).

    ``model_labels``: the model label set a built-in map was written for (None: any model whose
    class count covers the map's keys). ``ignore``: the void id of the dataset's masks, if known.
    """

    name: str
    classes: tuple[str, ...]
    mapping: Mapping[int, int]
    ignore: int | None = None
    model_labels: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def unmapped_id(self) -> int:
        """The prediction column that unmapped model ids land in (one past the last class)."""
        return len(self.classes)

    def mapped_classes(self) -> list[int]:
        """Dataset ids that some model class maps to (the only ones a model can get right)."""
        return sorted(set(self.mapping.values()))

    def lut(self) -> np.ndarray:
        """uint8 [256]: model id -> dataset id, unmapped ids -> ``unmapped_id``."""
        lut = np.full(256, self.unmapped_id, dtype=np.uint8)
        for src, dst in self.mapping.items():
            lut[src] = dst
        return lut

    def check_model(self, model_name: str, labels: Sequence[str]) -> None:
        """Raise ClassMapError if this map was not written for a model with ``labels``."""
        if self.model_labels is not None and tuple(labels) != self.model_labels:
            raise ClassMapError(
                f"class map {self.name!r} is for models with the classes "
                f"{', '.join(self.model_labels[:4])}, ... ({len(self.model_labels)}); model "
                f"{model_name!r} has {', '.join(labels[:4])}, ... ({len(labels)})"
            )
        too_big = sorted(k for k in self.mapping if k >= len(labels))
        if too_big:
            raise ClassMapError(
                f"class map {self.name!r} maps model class ids {too_big}, but model "
                f"{model_name!r} only has ids 0..{len(labels) - 1}"
            )


def identity_map(labels: Sequence[str], name: str = "identity") -> ClassMap:
    """Masks labelled with the model's own class ids (e.g. VOC masks for a VOC model)."""
    return ClassMap(name=name, classes=tuple(labels), mapping={i: i for i in range(len(labels))})


def _camvid(name: str, model_labels: Sequence[str], table: Mapping[str, str]) -> ClassMap:
    """Build a map to the 11 CamVid classes (void 11 ignored) from class names."""
    classes = tuple(CAMVID_LABELS[:11])
    mapping = {model_labels.index(src): classes.index(dst) for src, dst in table.items()}
    return ClassMap(
        name=name, classes=classes, mapping=mapping, ignore=11, model_labels=tuple(model_labels)
    )


# The tables of ../shared/data/camvid_segnet_test/README.md ("Mapping the models ...").
BUILTIN: dict[str, ClassMap] = {
    m.name: m
    for m in (
        _camvid("cityscapes-to-camvid", CITYSCAPES_LABELS, {
            "road": "Road", "sidewalk": "Pavement", "building": "Building", "wall": "Building",
            "fence": "Fence", "pole": "Pole", "traffic light": "SignSymbol",
            "traffic sign": "SignSymbol", "vegetation": "Tree", "terrain": "Tree", "sky": "Sky",
            "person": "Pedestrian", "rider": "Bicyclist", "car": "Car", "truck": "Car",
            "bus": "Car", "train": "Car", "motorcycle": "Bicyclist", "bicycle": "Bicyclist",
        }),
        # VOC covers CamVid only partly; every other VOC class (background too) is unmapped.
        _camvid("voc-to-camvid", VOC_LABELS, {
            "person": "Pedestrian", "car": "Car", "bus": "Car", "train": "Car",
            "bicycle": "Bicyclist", "motorbike": "Bicyclist",
        }),
    )
}  # fmt: skip


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_class_map(data: object, source: str) -> ClassMap:
    """Validate a loaded YAML document (see ``load_class_map``); ClassMapError says what's wrong."""

    def bad(msg: str) -> ClassMapError:
        return ClassMapError(f"class map {source}: {msg}")

    if not isinstance(data, dict):
        raise bad("must be a YAML mapping with keys 'classes' and 'map'")
    unknown = sorted(str(k) for k in set(data) - _YAML_KEYS)
    if unknown:
        raise bad(f"unknown key(s) {unknown}; valid: {sorted(_YAML_KEYS)}")
    classes = data.get("classes")
    if (
        not isinstance(classes, list)
        or not classes
        or len(classes) > 255
        or not all(isinstance(c, str) and c for c in classes)
    ):
        raise bad("'classes' must be a list of 1..255 non-empty names (position = id in masks)")
    if len(set(classes)) != len(classes):
        raise bad("'classes' has duplicate names")
    raw = data.get("map")
    if not isinstance(raw, dict) or not raw:
        raise bad("'map' must be a non-empty mapping 'model class id: dataset class id'")
    mapping: dict[int, int] = {}
    for src, dst in raw.items():
        if not _is_int(src) or not 0 <= src <= 255:
            raise bad(f"map key {src!r} is not a model class id (integer 0..255)")
        if not _is_int(dst) or not 0 <= dst < len(classes):
            raise bad(
                f"map {src}: {dst!r} is not a dataset class id (integer "
                f"0..{len(classes) - 1}, an index into 'classes')"
            )
        mapping[src] = dst
    ignore = data.get("ignore")
    if ignore is not None and (not _is_int(ignore) or not 0 <= ignore <= 255):
        raise bad(f"'ignore' must be a mask value 0..255, got {ignore!r}")
    name = data.get("name", Path(source).stem)
    return ClassMap(name=str(name), classes=tuple(classes), mapping=mapping, ignore=ignore)


def load_class_map(name_or_path: str | Path) -> ClassMap:
    """A built-in map by name, or a YAML file::

    name: my-map            # optional (default: the file's stem)
    classes: [Sky, Road]    # dataset class names; position = the id in the mask PNGs
    ignore: 255             # optional: the mask value of void pixels
    map:                    # model class id: dataset class id (unlisted ids are unmapped)
      10: 0
      0: 1
    """
    key = str(name_or_path)
    if key in BUILTIN:
        return BUILTIN[key]
    path = Path(name_or_path)
    if not path.is_file():
        raise ClassMapError(
            f"class map {key!r} is neither a built-in map ({', '.join(BUILTIN)}) nor a file"
        )
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ClassMapError(f"class map {path}: cannot read it as YAML: {e}") from None
    return parse_class_map(data, str(path))
