#!/usr/bin/env python
"""Pixel agreement of the Keras port with the official .tflite file, on the full image sets.

For each model and Keras mode: the keras runtime (on --keras-backend) and the tflite runtime
segment every image of the project's real data (both clips frame by frame, the 233 CamVid
test images, the Coral samples) and the photos unlike it (models.tools.fidelity); prints one
JSON line per model, mode and set with the mean agreement and the worst image:

  {"model", "keras_backend", "mode", "set", "images", "mean", "worst", "worst_image", "s"}

  SEGSTREAM_SHARED=../shared python scripts/fidelity.py --keras-backend tensorflow
  SEGSTREAM_SHARED=../shared python scripts/fidelity.py --keras-backend jax --out fid.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = [
    "mnv2-voc",
    "mnv2-voc-fast",
    "edgetpu-cityscapes",
    "mnv2-voc-dm05-float",
    "mnv2-voc-257",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--keras-backend", default="tensorflow", choices=["tensorflow", "jax"])
    p.add_argument(
        "--modes",
        nargs="+",
        default=["default"],
        choices=["default", "faithful", "float"],
        help="Keras modes (default: each model's own: faithful for uint8 files)",
    )
    p.add_argument(
        "--sets", nargs="+", default=["project", "photos"], choices=["project", "photos"]
    )
    p.add_argument(
        "--stride", type=int, default=1, help="every n-th clip frame / CamVid image (1: all)"
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the shared data folder (default $SEGSTREAM_SHARED/data)",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines here too")
    args = p.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.keras_backend  # before keras is first imported

    from segstream.models import fetch
    from segstream.models.registry import get_spec
    from segstream.models.runtime import load_segmenter
    from segstream.models.tools.fidelity import Agreement, measure, photo_images, project_images

    data = args.data or Path(os.environ.get("SEGSTREAM_SHARED", REPO.parent / "shared")) / "data"
    shared = data.parent
    if (shared / "models").is_dir():
        fetch.fetch([n for n in args.models], from_dir=shared, progress=False)
    photos = photo_images() if "photos" in args.sets else []
    sink = open(args.out, "a") if args.out else None  # noqa: SIM115 - closed below
    try:
        for name in args.models:
            spec = get_spec(name)
            with load_segmenter(name, "tflite", batch_sizes=(1, args.batch)) as ref:
                for mode in args.modes:
                    keras_mode = None if mode == "default" else mode
                    if not spec.quantized and (
                        keras_mode == "faithful"
                        or (keras_mode == "float" and "default" in args.modes)
                    ):
                        continue  # float files run float only, once
                    with load_segmenter(
                        name, "keras", batch_sizes=(1, args.batch), keras_mode=keras_mode
                    ) as seg:
                        total = Agreement()
                        for which in args.sets:
                            t0 = time.perf_counter()
                            images = (
                                project_images(data, args.stride)
                                if which == "project"
                                else iter(photos)
                            )
                            agreement = measure(seg, ref, images, chunk=args.batch)
                            total.names += agreement.names
                            total.values += agreement.values
                            emit(
                                {
                                    "model": name,
                                    "keras_backend": seg.keras_backend,
                                    "mode": seg.mode,
                                    "set": which,
                                    **agreement.summary(),
                                    "s": round(time.perf_counter() - t0, 1),
                                },
                                sink,
                            )
                        if len(args.sets) > 1:
                            emit(
                                {
                                    "model": name,
                                    "keras_backend": seg.keras_backend,
                                    "mode": seg.mode,
                                    "set": "all",
                                    **total.summary(),
                                },
                                sink,
                            )
    finally:
        if sink:
            sink.close()
    return 0


def emit(rec: dict, sink) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if sink:
        sink.write(line + "\n")
        sink.flush()


if __name__ == "__main__":
    raise SystemExit(main())
