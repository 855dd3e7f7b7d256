"""Reference images named in a row: splitting the cell into paths, and checking each file once (readable, an image
format the API takes, verified by Pillow)."""

from __future__ import annotations

import os
import stat
from typing import Any

from batcher.storage import gcs

from .cells import BadCell
from .sources import URI_RE


#: Image formats the Gemini API accepts as input, by Pillow's format name (MPO is a multi-picture JPEG).
REFERENCE_IMAGE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "HEIF", "HEIC"})
#: Reference-image checks are cached per path; the cache is cleared when it grows past this many paths.
_IMAGE_CACHE_MAX = 200_000


def split_references(raw: Any) -> list[str]:
    """The paths in a reference_images cell: a `|`-separated string or a list of strings."""
    if isinstance(raw, str):
        items = raw.split("|")
    elif isinstance(raw, (list, tuple)):
        items = []
        for item in raw:
            if item is None:
                continue
            if not isinstance(item, str):
                raise BadCell("reference_images must be text: paths separated by '|', or a list of paths")
            items.append(item)
    else:
        raise BadCell("reference_images must be text: paths separated by '|', or a list of paths")
    return [item.strip() for item in items if item.strip()]


class ImageChecker:
    """Checks reference images once per distinct path."""

    def __init__(self, base_dir: str):
        self.base_dir = base_dir
        self.cache: dict[str, str | None] = {}

    def resolve(self, item: str) -> str:
        if URI_RE.match(item):
            return item
        if gcs.is_gcs(self.base_dir):  # relative to a gs:// manifest: an object beside it
            return gcs.join(self.base_dir, os.path.normpath(item).lstrip("./"))
        return os.path.abspath(os.path.join(self.base_dir, item))

    def problem(self, path: str) -> str | None:
        if URI_RE.match(path):
            return None  # remote objects are checked where they are read
        try:
            return self.cache[path]
        except KeyError:
            pass
        if len(self.cache) >= _IMAGE_CACHE_MAX:
            self.cache.clear()
        result = self.cache[path] = _image_problem(path)
        return result

    def close(self) -> None:
        self.cache.clear()


def _image_problem(path: str) -> str | None:
    from PIL import Image  # imported lazily: most manifests have no reference images

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"reference image not found: {path}"
    except OSError as exc:
        return f"reference image cannot be read: {path} ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return f"reference image is not a file: {path}"
    try:
        with open(path, "rb") as fh:
            with Image.open(fh) as image:
                fmt = image.format
                image.verify()
    except PermissionError:
        return f"reference image is not readable (permission denied): {path}; check its permissions"
    except Exception as exc:  # Pillow raises many kinds (UnidentifiedImageError, SyntaxError, ...)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"reference image is not a readable image: {path} ({detail})"
    if fmt not in REFERENCE_IMAGE_FORMATS:
        return f"reference image format {fmt} is not accepted by the API; use PNG, JPEG or WEBP: {path}"
    return None
