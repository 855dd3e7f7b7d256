"""Deterministic, cheap PNGs for the emulator.

Every image is a 1-bit palette PNG: the pixel data (a diagonal stripe pattern) depends only on the
dimensions and is compressed once and cached; the two palette colours come from the request digest, and
the file is padded to the target size with a private ancillary chunk (``emPd``) of bytes derived from the
digest (SHAKE-256). Same digest -> same bytes; different digest -> different colours and padding.
Any PNG decoder (Pillow included) reads these as ordinary images. Used by generate.py, for both services.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PAD_CHUNK_TYPE = b"emPd"  # ancillary, private, reserved-bit clear, safe-to-copy


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@functools.lru_cache(maxsize=64)
def _idat(width: int, height: int) -> bytes:
    """Compressed 1-bit scanlines with a diagonal stripe pattern (cached per size)."""
    row_bytes = (width + 7) // 8
    period = 64  # stripe period in pixels
    rows = []
    cache: dict[int, bytes] = {}
    for y in range(height):
        phase = y % period
        row = cache.get(phase)
        if row is None:
            bits = bytearray(row_bytes)
            for x in range(width):
                if ((x + phase) // (period // 2)) % 2:
                    bits[x >> 3] |= 0x80 >> (x & 7)
            row = b"\x00" + bytes(bits)  # filter type 0
            cache[phase] = row
        rows.append(row)
    return _chunk(b"IDAT", zlib.compress(b"".join(rows), 9))


def make_png(width: int, height: int, digest: bytes, target_bytes: int = 0) -> bytes:
    """A valid PNG of ``width``x``height`` pixels, about ``target_bytes`` long (never shorter than the
    bare image), fully determined by ``digest``."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0))
    colours = hashlib.sha256(b"palette:" + digest).digest()[:6]
    plte = _chunk(b"PLTE", colours)
    text = _chunk(b"tEXt", b"Comment\x00batcher-emulator " + digest.hex().encode())
    idat = _idat(width, height)
    iend = _chunk(b"IEND", b"")
    head = PNG_SIGNATURE + ihdr + plte + text
    size = len(head) + len(idat) + len(iend)
    pad = target_bytes - size - 12
    parts = [head]
    if pad > 0:
        parts.append(_chunk(PAD_CHUNK_TYPE, hashlib.shake_256(b"pad:" + digest).digest(pad)))
    parts += [idat, iend]
    return b"".join(parts)
