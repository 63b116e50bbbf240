"""Job ids: 128 random bits from the OS CSPRNG, read a page at a time."""

from __future__ import annotations

import os

_ID_BYTES = 16
_PAGE = 4096


class JobIds:
    """Hands out unguessable ids; one ``os.urandom`` call per 256 ids instead of one each."""

    def __init__(self) -> None:
        self._page = b""
        self._pos = 0

    def next(self) -> str:
        if self._pos + _ID_BYTES > len(self._page):
            self._page = os.urandom(_PAGE)
            self._pos = 0
        chunk = self._page[self._pos : self._pos + _ID_BYTES]
        self._pos += _ID_BYTES
        return chunk.hex()
