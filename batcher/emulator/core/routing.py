"""Routes: each service's URL table, and which route of it a request path is for.

A route's key is the name ``stats()["requests"]`` counts it under and fault targets (``fail_nth``,
``rate_limit_nth``, ``fail_routes``) match, e.g. ``"GET /{v}/files/{id}"``; the key is also the route's pattern,
matched against the path's non-empty segments:

- a literal segment matches itself;
- ``{v}`` matches an API version the service serves (the response reads it as ``request.api_version``);
- ``{name}`` matches a segment without ``:``;
- ``{name}:verb`` matches a segment ``<x>:verb`` where ``<x>`` has no ``:`` (its value is ``<x>``);
- a trailing ``?param`` (``"POST /upload/{v}/files?upload_id"``) requires that query parameter.

The other placeholders' values are the response method's arguments, in path order. In a table the first route
that matches wins, so a route that requires a query parameter comes before the same path without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

KINDS = ("json", "chunk", "download")


class Route:
    """One route: its key (also its pattern), the response method that answers it, and its kind.

    ``kind``: ``json`` (a JSON call: API key checked, every HTTP fault applies), ``chunk`` (an upload chunk: the
    upload id is the credential, only ``*_nth`` faults apply), ``download`` (streamed bytes: only ``*_nth``
    faults apply). ``respond(responses, request, *values)`` is a method of the service's responses class."""

    def __init__(self, key: str, respond: Callable[..., None], kind: str = "json") -> None:
        if kind not in KINDS:
            raise ValueError(f"route kind must be one of {KINDS}, not {kind!r}")
        self.key, self.respond, self.kind = key, respond, kind
        self.method, _, target = key.partition(" ")
        path, _, self.query_param = target.partition("?")
        self.segments = [s for s in path.split("/") if s]

    def match(self, method: str, segments: list[str], query: dict[str, list[str]],
              versions: re.Pattern[str]) -> dict[str, str] | None:
        """The placeholders' values, in path order (``v`` included), if the request is for this route, else None."""
        if method != self.method or len(segments) != len(self.segments):
            return None
        if self.query_param and self.query_param not in query:
            return None
        params: dict[str, str] = {}
        for pattern, segment in zip(self.segments, segments):
            if pattern == "{v}":
                if not versions.fullmatch(segment):
                    return None
                params["v"] = segment
            elif pattern.startswith("{"):
                name, _, suffix = pattern[1:].partition("}")
                value, colon, verb = segment.partition(":")
                if (colon + verb) != suffix:
                    return None
                params[name] = value
            elif pattern != segment:
                return None
        return params


class Urls:
    """A service's URL table: the API versions it serves (a regular expression) and its routes, in order."""

    def __init__(self, versions: str, routes: Sequence[Route]) -> None:
        self.versions = re.compile(versions)
        self.routes = tuple(routes)

    def match(self, method: str, segments: list[str],
              query: dict[str, list[str]]) -> tuple[Route, dict[str, str]] | None:
        for route in self.routes:
            params = route.match(method, segments, query, self.versions)
            if params is not None:
                return route, params
        return None


@dataclass(frozen=True)
class Mount:
    """A service as the HTTP server serves it: its URL table, and the object whose methods answer the routes
    (``responses.authenticate(request)`` checks a request's credentials before any route but an upload chunk)."""

    urls: Urls
    responses: Any
