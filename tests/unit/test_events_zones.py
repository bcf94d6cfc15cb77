"""Zones: validation with key paths, and exact coverage on synthetic masks."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from segstream.stream.events.config import ZoneConfig, Zones
from segstream.stream.events.zones import NUM_IDS, ZoneCoverage, named, rasterise

SQUARE = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]


class Stream(BaseModel):
    zones: Zones


def errors(zones: list) -> list[tuple[tuple, str]]:
    with pytest.raises(ValidationError) as e:
        Stream.model_validate({"zones": zones})
    return [(err["loc"], err["msg"]) for err in e.value.errors()]


def zone(name: str = "floor", polygon: list | None = None, **kw) -> dict:
    return {"name": name, "polygon": SQUARE if polygon is None else polygon, **kw}


def test_valid_zone_with_rules_parses_the_yaml_form():
    s = Stream.model_validate(
        {
            "zones": [
                zone(
                    polygon=[[0.0, 0.5], [1.0, 0.5], [1.0, 1.0], [0.0, 1.0]],
                    rules=[{"class": "person", "above": 0.02, "for_s": 1.0, "clear_s": 3.0}],
                ),
                # concave (an L): fine
                zone("dock", [[0, 0], [0.5, 0], [0.5, 0.2], [0.2, 0.2], [0.2, 0.5], [0, 0.5]]),
            ]
        }
    )
    assert s.zones[0].rules[0].class_name == "person"
    assert s.zones[0].rules[0].above == 0.02
    assert s.zones[1].polygon[3] == (0.2, 0.2)


@pytest.mark.parametrize(
    ("bad", "loc", "words"),
    [
        (zone(polygon=[[0, 0], [1, 0]]), ("zones", 0, "polygon"), "at least 3"),
        (zone(polygon=[[0, 0], [1.5, 0], [1, 1]]), ("zones", 0, "polygon"), "outside 0..1"),
        (zone(polygon=[[0, 0], [1, 0], [-0.1, 1]]), ("zones", 0, "polygon"), "outside 0..1"),
        # a bow tie: edges 0 and 2 cross
        (zone(polygon=[[0, 0], [1, 1], [1, 0], [0, 1]]), ("zones", 0, "polygon"), "self-inter"),
        # an edge folding back over its neighbour
        (zone(polygon=[[0, 0], [1, 0], [0.5, 0], [0.5, 1]]), ("zones", 0, "polygon"), "self-in"),
        # all on one line: the last edge runs back over the others
        (zone(polygon=[[0, 0], [0.5, 0.5], [1, 1]]), ("zones", 0, "polygon"), "self-inter"),
        (zone("a/b"), ("zones", 0, "name"), "letters, digits"),
        (zone(rules=[{"class": "person", "above": 1.5}]), ("zones", 0, "rules", 0, "above"), "1"),
        (
            zone(rules=[{"class": "person", "above": 0.1}, {"class": "person", "above": 0.2}]),
            ("zones", 0, "rules"),
            "repeated: person",
        ),
        (
            zone(rules=[{"class": "dog", "above": 0.1, "when": 1}]),
            ("zones", 0, "rules", 0, "when"),
            "Extra",
        ),
    ],
)
def test_invalid_zone_is_reported_at_its_key_path(bad: dict, loc: tuple, words: str):
    errs = errors([bad])
    assert len(errs) == 1, errs
    assert errs[0][0] == loc
    assert words in errs[0][1]


def test_zone_names_must_be_unique():
    errs = errors([zone("floor"), zone("door"), zone("floor")])
    assert errs == [(("zones",), "Value error, zone names must be unique; repeated: floor")]


def test_rasterise_counts_pixel_centres_exactly():
    # a rectangle on pixel borders: 50 x 50 pixels
    r = rasterise([(0.25, 0.5), (0.75, 0.5), (0.75, 1.0), (0.25, 1.0)], 100, 100)
    assert r.pixels == 2500
    assert (r.rows, r.cols) == (slice(50, 100), slice(25, 75))
    # a right triangle: centres with (i + .5) + (j + .5) < 100, i.e. i + j <= 98
    assert rasterise([(0, 0), (1, 0), (0, 1)], 100, 100).pixels == 99 * 100 // 2
    # the whole frame, any size
    assert rasterise(SQUARE, 37, 53).pixels == 37 * 53


def _inside(poly: np.ndarray, x: float, y: float) -> bool:
    """Textbook even-odd test of one point (the reference for the vectorised rasteriser)."""
    inside = False
    n = len(poly)
    for k in range(n):
        (ax, ay), (bx, by) = poly[k], poly[(k + 1) % n]
        if (ay <= y < by or by <= y < ay) and x < ax + (y - ay) * (bx - ax) / (by - ay):
            inside = not inside
    return inside


def test_rasterise_matches_a_point_in_polygon_reference_on_a_concave_zone():
    poly = [(0.1, 0.1), (0.9, 0.2), (0.6, 0.45), (0.85, 0.9), (0.3, 0.7), (0.05, 0.95)]
    h, w = 41, 67
    r = rasterise(poly, h, w)
    full = np.zeros((h, w), bool)
    full[r.rows, r.cols] = r.inside > 0
    px = np.asarray(poly) * (w, h)
    ref = np.array([[_inside(px, j + 0.5, i + 0.5) for j in range(w)] for i in range(h)])
    assert ref.sum() > 500
    assert np.array_equal(full, ref)
    assert r.pixels == ref.sum()


def test_coverage_is_the_exact_fraction_of_zone_pixels_per_class():
    mask = np.zeros((100, 100), np.uint8)
    mask[:, :40] = 15  # person on the left 40 columns
    mask[80:, :] = 8  # cat on the bottom 20 rows
    cov = ZoneCoverage(
        [
            ZoneConfig(name="bottom", polygon=[(0.25, 0.5), (0.75, 0.5), (0.75, 1.0), (0.25, 1.0)]),
            ZoneConfig(name="top", polygon=[(0, 0), (1, 0), (1, 0.5), (0, 0.5)]),
        ]
    )
    got = cov.compute(mask)
    assert set(got) == {"bottom", "top"}
    b = got["bottom"]
    assert b.shape == (NUM_IDS,)
    # bottom zone: rows 50..99, cols 25..74 = 2500 px; person: rows 50..79, cols 25..39 = 450
    assert b[15] == pytest.approx(450 / 2500, abs=1e-7)
    assert b[8] == pytest.approx(1000 / 2500, abs=1e-7)  # rows 80..99 x 50 cols
    assert b[0] == pytest.approx(1050 / 2500, abs=1e-7)
    assert got["top"][15] == pytest.approx(0.4, abs=1e-7)
    assert got["top"][8] == 0
    labels = ["background", *[f"c{i}" for i in range(1, 15)], "person", "x", "y"]
    labels[8] = "cat"
    assert named(b, labels, ["x"]) == pytest.approx(
        {"background": 0.42, "cat": 0.4, "person": 0.18, "x": 0.0}
    )


def test_rasters_are_cached_per_size_and_dropped_when_the_polygon_changes():
    z = ZoneConfig(name="a", polygon=[(0, 0), (1, 0), (0, 1)])
    cov = ZoneCoverage([z])
    r1 = cov.raster(z, 50, 50)
    assert cov.raster(z, 50, 50) is r1
    assert cov.raster(z, 100, 100).pixels == 4950  # another size: another raster
    cov.set_zones([z])  # unchanged: kept
    assert cov.raster(z, 50, 50) is r1
    z2 = ZoneConfig(name="a", polygon=[(0, 0), (1, 0), (1, 1)])
    cov.set_zones([z2])
    assert cov.raster(z2, 50, 50) is not r1


def test_no_zones_computes_nothing():
    cov = ZoneCoverage()
    assert cov.compute(np.zeros((513, 513), np.uint8)) == {}
    assert cov._cache == {}


def test_a_zone_smaller_than_a_pixel_covers_nothing():
    cov = ZoneCoverage([ZoneConfig(name="dot", polygon=[(0.5, 0.5), (0.501, 0.5), (0.5, 0.501)])])
    assert not cov.compute(np.full((10, 10), 3, np.uint8))["dot"].any()
