"""The event API: coverage events of the streams' zones, their peak-frame media, deletion."""

from __future__ import annotations

from aiohttp import web

from segstream.stream.api.context import backend
from segstream.stream.api.spec import Body, Endpoint, error, read_query
from segstream.stream.schemas import Error, EventOut, EventPage, EventQuery


def _json(model: EventOut | EventPage) -> web.Response:
    # by_alias: an event's class is `class` in the JSON (as in the YAML and the alerts).
    return web.Response(text=model.model_dump_json(by_alias=True), content_type="application/json")


async def list_events(request: web.Request) -> web.Response:
    q = read_query(request, EventQuery)
    if q.since is not None and q.until is not None and q.until <= q.since:
        raise error(422, "until must be after since")
    return _json(await backend(request).list_events(q))


async def get_event(request: web.Request) -> web.Response:
    return _json(await backend(request).get_event(request.match_info["id"]))


async def _media(request: web.Request, kind: str, content_type: str) -> web.Response:
    data = await backend(request).event_media(request.match_info["id"], kind)
    # An event's media change while it is open (a new peak): revalidate.
    return web.Response(body=data, content_type=content_type, headers={"Cache-Control": "no-cache"})


async def event_snapshot(request: web.Request) -> web.Response:
    return await _media(request, "snapshot", "image/jpeg")


async def event_mask(request: web.Request) -> web.Response:
    return await _media(request, "mask", "image/png")


async def event_clip(request: web.Request) -> web.Response:
    data = await backend(request).event_media(request.match_info["id"], "clip")
    headers = {"Cache-Control": "no-cache", "Accept-Ranges": "bytes"}
    try:
        want = request.http_range  # players ask for byte ranges (Safari insists on them)
    except ValueError:
        want = slice(None, None)  # a malformed Range is ignored, as RFC 9110 allows
    if want.start is None and want.stop is None:
        return web.Response(body=data, content_type="video/mp4", headers=headers)
    start, stop, _ = want.indices(len(data))
    if start >= stop:
        raise error(416, "range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
    return web.Response(
        status=206, body=data[start:stop], content_type="video/mp4", headers=headers
    )


async def delete_event(request: web.Request) -> web.Response:
    await backend(request).delete_event(request.match_info["id"])
    return web.Response(status=204)


_404 = {404: Body(Error, description="Unknown event (or no such media yet).")}
_OFF = {
    503: Body(
        Error,
        description="Events are off: the store is unusable (the reason); at a cluster "
        "gateway also while the cluster's events hub is away (Retry-After).",
    ),
}

ENDPOINTS = [
    Endpoint(
        "GET",
        "/api/events",
        list_events,
        "Coverage events, newest first, filtered; `next` pages on",
        tag="events",
        query=EventQuery,
        responses={
            200: Body(EventPage),
            400: Body(Error, description="A cursor this service did not make."),
            **_OFF,
        },
    ),
    Endpoint(
        "GET",
        "/api/events/{id}",
        get_event,
        "One event",
        tag="events",
        responses={200: Body(EventOut), **_404, **_OFF},
    ),
    Endpoint(
        "GET",
        "/api/events/{id}/snapshot.jpg",
        event_snapshot,
        "The annotated JPEG of the event's peak frame",
        tag="events",
        responses={200: Body(None, media="image/jpeg"), **_404, **_OFF},
    ),
    Endpoint(
        "GET",
        "/api/events/{id}/mask.png",
        event_mask,
        "The class mask of the event's peak frame: 8-bit greyscale PNG, value = class id",
        tag="events",
        responses={200: Body(None, media="image/png"), **_404, **_OFF},
    ),
    Endpoint(
        "GET",
        "/api/events/{id}/clip.mp4",
        event_clip,
        "The event's clip: H.264 MP4 from events.clips.pre_roll_s before the start to the end "
        "(at most events.clips.max_s), redacted where privacy is on; streams with record_clips",
        tag="events",
        responses={
            200: Body(None, media="video/mp4"),
            206: Body(None, media="video/mp4", description="The byte range asked for."),
            416: Body(Error, description="A byte range beyond the clip."),
            **_404,
            **_OFF,
        },
    ),
    Endpoint(
        "DELETE",
        "/api/events/{id}",
        delete_event,
        "Delete an event and its media",
        role="admin",
        tag="events",
        responses={204: Body(None, media=""), **_404, **_OFF},
    ),
]
