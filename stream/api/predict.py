"""Single-image prediction: the IBM MAX Image Segmenter API, wire-compatible, and a native one.

Uploads cannot take the service down: the size is capped while reading, the pixel count is
read from the image header before anything is decoded (413 above the limit), at most
`predict.max_concurrent` images are decoded and segmented at once (503 + Retry-After beyond),
and every bad upload is a 4xx with a JSON error."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import warnings
from typing import Any, Literal

import cv2
import numpy as np
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from segstream.models.tools.data import encode_palette_png
from segstream.stream.api.context import CONFIG, backend
from segstream.stream.api.spec import Body, Endpoint, error, read_query, reply
from segstream.stream.render import class_fractions
from segstream.stream.sanitize import sanitize_text
from segstream.stream.schemas import (
    Error,
    ImageUpload,
    MaxLabel,
    MaxMetadata,
    MaxPrediction,
    Prediction,
)
from segstream.stream.service import Service

log = logging.getLogger(__name__)
PREDICT_SLOTS = web.AppKey("predict_slots", asyncio.Semaphore)
MAX_IMAGE_SIZE = web.AppKey("max_image_size", int)
JSON_MASK_PIXELS = 2048 * 2048  # a JSON mask beyond this is megabytes of digits: use PNG
# DeepLab pads its input with the mean pixel (127.5); the uint8 model input takes 128.
PAD_VALUE = 128
_LABELS = TypeAdapter(list[MaxLabel])


def image_size_from_env(env: dict[str, str] | None = None) -> int:
    """MAX's IMAGE_SIZE: the longer side of the image the model sees, 16..1024, else 513."""
    raw = (os.environ if env is None else env).get("IMAGE_SIZE", "513")
    try:
        size = int(raw)
    except ValueError:
        size = -1
    if not 16 <= size <= 1024:
        warnings.warn(f"IMAGE_SIZE={raw!r} not in 16..1024; using 513", stacklevel=2)
        log.warning("IMAGE_SIZE=%r not in 16..1024; using 513", raw)
        size = 513
    return size


async def read_upload(request: web.Request) -> bytes:
    """The bytes of the multipart field `image`, at most predict.max_bytes."""
    limit = request.app[CONFIG].predict.max_bytes
    if request.content_type != "multipart/form-data":
        raise error(415, "send multipart/form-data with the image in the field 'image'")
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise error(413, f"upload larger than {limit} bytes")
    try:
        reader = await request.multipart()
        async for part in reader:
            if isinstance(part, BodyPartReader) and part.name == "image":
                data = await _read_capped(part, limit)
                if not data:
                    raise error(400, "the field 'image' is empty")
                return data
    except (ValueError, AssertionError, HttpProcessingError) as e:  # malformed multipart
        raise error(400, f"malformed multipart body: {sanitize_text(str(e))[:200]}") from None
    raise error(400, "missing form field 'image'")


async def _read_capped(part: BodyPartReader, limit: int) -> bytes:
    buf = bytearray()
    while chunk := await part.read_chunk(256 * 1024):
        buf += chunk
        if len(buf) > limit:
            raise error(413, f"upload larger than {limit} bytes")
    return bytes(buf)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image, its size checked from the header alone (nothing decoded yet)."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow's own (higher) header check
        raise error(413, f"image too large: {e}; the limit is {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise error(
            400, "the upload is not an image this service reads (JPEG, PNG, BMP, GIF, TIFF, WebP)"
        ) from None
    w, h = img.size
    if w < 1 or h < 1:
        raise error(400, "the image has no pixels")
    if w * h > max_pixels:
        raise error(413, f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    return img


def decode_rgb(img: Image.Image) -> Image.Image:
    """The decoded RGB image; 400 for a truncated or damaged file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as e:
        raise error(400, f"the image could not be decoded (truncated or damaged?): {e}") from None


async def _limited(request: web.Request, work: Any, *args: Any) -> Any:
    """Runs `work` in a thread if a prediction slot is free; 503 + Retry-After otherwise."""
    slots = request.app[PREDICT_SLOTS]
    if slots.locked():
        raise error(
            503, "busy: too many predictions at once; retry shortly", headers={"Retry-After": "1"}
        )
    async with slots:
        return await asyncio.to_thread(work, *args)


def _ready(service: Service) -> None:
    if not service.ready:
        raise error(503, "model warming up")


# -- MAX ---------------------------------------------------------------------------------------


def max_resize(img: Image.Image, longer: int) -> Image.Image:
    """As MAX does: the longer side becomes `longer`, each side rounded down, antialiased."""
    w, h = img.size
    ratio = longer / max(w, h)
    return img.resize((max(1, int(ratio * w)), max(1, int(ratio * h))), Image.Resampling.LANCZOS)


def segment_padded(service: Any, rgb: np.ndarray) -> np.ndarray:
    """DeepLab's own preprocessing: pad to the model's input with the mean value, segment, cut
    the padding off. An image larger than the input is first scaled to fit (as the exported
    graph does), its mask scaled back with nearest neighbours."""
    mh, mw = service.segmenter.input_size
    h, w = rgb.shape[:2]
    scale = min(1.0, mh / h, mw / w)
    small = rgb
    if scale < 1.0:
        size = (max(1, int(w * scale)), max(1, int(h * scale)))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    x = np.full((1, mh, mw, 3), PAD_VALUE, np.uint8)
    x[0, :sh, :sw] = small
    mask = service.segment_batch(x)[0][:sh, :sw]
    if (sh, sw) != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return mask


async def max_predict(request: web.Request) -> web.StreamResponse:
    return await backend(request).model(request, lambda service: _max_predict(request, service))


async def _max_predict(request: web.Request, service: Service) -> web.Response:
    _ready(service)
    data = await read_upload(request)
    img = open_image(data, service.cfg.predict.max_pixels)

    def run() -> np.ndarray:
        resized = max_resize(decode_rgb(img), request.app[MAX_IMAGE_SIZE])
        return segment_padded(service, np.asarray(resized))

    mask = await _limited(request, run)
    return reply(
        MaxPrediction(
            status="ok", image_size=[int(mask.shape[1]), int(mask.shape[0])], seg_map=mask.tolist()
        )
    )


async def max_labels(request: web.Request) -> web.StreamResponse:
    return await backend(request).model(request, _max_labels)


async def _max_labels(service: Service) -> web.Response:
    seg = service.segmenter
    if seg is None:
        raise error(503, "model is loading")
    return reply([MaxLabel(id=i, name=n) for i, n in enumerate(seg.labels)], adapter=_LABELS)


async def max_metadata(request: web.Request) -> web.StreamResponse:
    return await backend(request).model(request, _max_metadata)


async def _max_metadata(service: Service) -> web.Response:
    seg = service.segmenter
    if seg is None:
        raise error(503, "model is loading")
    return reply(
        MaxMetadata(
            id=f"segstream-{seg.name}",
            name=f"segstream {seg.name}",
            description=f"segstream: {seg.spec.description} ({seg.backend} runtime)",
            type="Semantic Image Segmentation",
            license="Apache-2.0",
            source=seg.spec.url,
        )
    )


# -- native ------------------------------------------------------------------------------------


class PredictQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["png", "json"] = Field(
        "png", description="png: 8-bit palette PNG (pixel = class id); json: rows of ids."
    )


async def predict(request: web.Request) -> web.StreamResponse:
    """The class mask at the image's own size (whole image resized to the model's input)."""
    q = read_query(request, PredictQuery)
    return await backend(request).model(request, lambda service: _predict(request, service, q))


async def _predict(request: web.Request, service: Service, q: PredictQuery) -> web.Response:
    _ready(service)
    data = await read_upload(request)
    img = open_image(data, service.cfg.predict.max_pixels)
    w, h = img.size
    if q.format == "json" and w * h > JSON_MASK_PIXELS:
        raise error(413, f"a JSON mask is limited to {JSON_MASK_PIXELS} pixels; ask format=png")

    def run() -> np.ndarray:
        rgb = np.asarray(decode_rgb(img))
        small = service.segment_image(rgb, bgr=False)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)

    mask = await _limited(request, run)
    seg = service.segmenter
    assert seg is not None  # ready
    if q.format == "png":
        png = await asyncio.to_thread(encode_palette_png, mask, seg.palette)
        return web.Response(body=png, content_type="image/png")
    fr = class_fractions(mask, len(seg.labels))
    return reply(
        Prediction(
            width=w,
            height=h,
            labels=list(seg.labels),
            mask=mask.tolist(),
            classes={seg.labels[i]: round(float(f), 4) for i, f in enumerate(fr) if f > 0},
        )
    )


_UPLOAD = Body(ImageUpload, media="multipart/form-data")
_UPLOAD_ERRORS = {
    400: Body(Error, description="Empty, truncated or not an image; no 'image' field."),
    413: Body(Error, description="Upload or image (pixels) above the limit."),
    415: Body(Error, description="Not multipart/form-data."),
    503: Body(Error, description="Warming up, or too many predictions at once (Retry-After)."),
}

ENDPOINTS = [
    Endpoint(
        "POST",
        "/model/predict",
        max_predict,
        "MAX-compatible: segment an image resized so its longer side is IMAGE_SIZE",
        tag="max",
        body=_UPLOAD,
        responses={200: Body(MaxPrediction), **_UPLOAD_ERRORS},
    ),
    Endpoint(
        "GET",
        "/model/labels",
        max_labels,
        "MAX-compatible: the classes, in order",
        tag="max",
        responses={200: Body(list[MaxLabel]), 503: Body(Error)},
    ),
    Endpoint(
        "GET",
        "/model/metadata",
        max_metadata,
        "MAX-compatible: what the model is",
        tag="max",
        responses={200: Body(MaxMetadata), 503: Body(Error)},
    ),
    Endpoint(
        "POST",
        "/api/predict",
        predict,
        "Segment an image; the mask at the image's own size, as PNG or JSON",
        tag="predict",
        body=_UPLOAD,
        query=PredictQuery,
        responses={
            200: Body(
                Prediction,
                alt_media=("image/png",),
                description="format=png (default): a palette PNG; format=json: the ids",
            ),
            **_UPLOAD_ERRORS,
        },
    ),
]
