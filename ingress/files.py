"""The Files API (OpenAI's): upload a batch's input file, list, read and delete files.

A file belongs to the tenant that uploaded it; every other tenant gets 404.
An upload (``multipart/form-data``: ``purpose=batch`` and a ``file``) is streamed
to the file store, never held whole in memory, and checked line by line on
the way (:mod:`llm_broker.shared.batchlines`): each line must be a request the
ingress would admit, with a ``custom_id`` unique in the file. The first bad
line, or a file past ``files.max_bytes`` or ``files.max_lines``, ends the
upload: what was written is deleted, and the answer names the line.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from llm_broker.ingress.admission import identify, redis_call
from llm_broker.ingress.bodies import json_response, limit_query
from llm_broker.ingress.state import STATE, State
from llm_broker.shared.batchlines import MAX_LINE, LineError, iter_lines, parse_line
from llm_broker.shared.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from llm_broker.shared.files import CHUNK, FileRecord, TooLarge, new_file_id

log = logging.getLogger("llm_broker.ingress")

#: The purposes an upload may have.
PURPOSES = ("batch",)
MAX_LIST_LIMIT = 10_000
_MAX_LIST_PAGES = 10
#: The form's other fields (``purpose``…), all together, and its parts.
_MAX_FIELDS_BYTES = 64 * 1024
_MAX_PARTS = 32
#: What a multipart body may hold beyond the file: boundaries, part headers, fields.
_OVERHEAD = 1024 * 1024
_MAX_FILENAME = 255
#: What reading a multipart body raises when the body is malformed or ends early
#: (the client went away: nobody reads the 400, but it is no server error).
_READ_ERRORS = (ValueError, RequestPayloadError, HttpProcessingError, ConnectionResetError)


#: The API's paths (see :func:`add_routes`).
PATHS = ("/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/files", create_file)
    r.add_get("/v1/files", list_files)
    r.add_get("/v1/files/{file_id}", retrieve_file)
    r.add_delete("/v1/files/{file_id}", delete_file)
    r.add_get("/v1/files/{file_id}/content", file_content)


# ---------------------------------------------------------------- upload


def _malformed(e: BaseException) -> BadRequest:
    text = " ".join(str(e).split())[:200]
    return BadRequest(f"the multipart body is malformed or ends early: {text}", code="invalid_body")


def _check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise BadRequest(
            f"Invalid value for 'purpose': {purpose[:100]!r}; supported values are "
            + ", ".join(repr(p) for p in PURPOSES),
            param="purpose",
            code="invalid_value",
        )


async def _field(part: BodyPartReader, budget: int) -> bytes:
    """A form field's value, refused past ``budget`` bytes."""
    data = bytearray()
    while True:
        try:
            chunk = await part.read_chunk(CHUNK)
        except _READ_ERRORS as e:
            raise _malformed(e) from e
        if not chunk:
            break
        data += chunk
        if len(data) > budget:
            raise BadRequest(
                f"the form fields besides 'file' exceed {_MAX_FIELDS_BYTES} bytes",
                param=part.name,
            )
    return bytes(data)


class _Upload:
    """The file part, streamed to the store and checked line by line on the way."""

    def __init__(self, state: State, part: BodyPartReader) -> None:
        self.state = state
        self.part = part
        self.size = 0
        self.lines = 0
        #: custom_id digests -> the line that has it (16 bytes an id, not the id).
        self.seen: dict[bytes, int] = {}
        #: What was read and is not yet passed on to the store.
        self.pending: deque[bytes] = deque()

    async def _received(self) -> AsyncIterator[bytes]:
        limit = self.state.config.files.max_bytes
        while True:
            try:
                chunk = await self.part.read_chunk(CHUNK)
            except _READ_ERRORS as e:
                raise _malformed(e) from e
            if not chunk:
                return
            self.size += len(chunk)
            if self.size > limit:
                raise TooLarge(f"the file is larger than {limit} bytes")
            self.pending.append(chunk)
            yield chunk

    async def checked(self) -> AsyncIterator[bytes]:
        """The file's bytes as received, each passed on once the lines it ends are checked."""
        max_lines = self.state.config.files.max_lines
        async for line_no, line, _ in iter_lines(self._received(), MAX_LINE):
            parsed = parse_line(line, line_no)
            self.lines += 1
            if self.lines > max_lines:
                raise BadRequest(
                    f"line {line_no}: the file has more than {max_lines} requests "
                    "(files.max_lines)",
                    param="file",
                    code="too_many_lines",
                )
            digest = hashlib.blake2b(parsed.custom_id.encode(), digest_size=16).digest()
            first = self.seen.setdefault(digest, line_no)
            if first != line_no:
                raise LineError(
                    f"duplicate custom_id {parsed.custom_id[:100]!r} (also on line {first}); "
                    "each line's custom_id must be unique in the file",
                    line_no,
                    "custom_id",
                )
            while self.pending:
                yield self.pending.popleft()
        while self.pending:
            yield self.pending.popleft()


async def _store(state: State, part: BodyPartReader, name: str) -> _Upload:
    """Write the file part under ``name``, checked; a 400 or 413 leaves nothing stored."""
    encoding = part.headers.get("Content-Transfer-Encoding", "binary").lower()
    if encoding not in ("binary", "7bit", "8bit") or "Content-Encoding" in part.headers:
        raise BadRequest(
            "the file part must be sent as is (no Content-Transfer-Encoding or Content-Encoding)",
            param="file",
        )
    upload = _Upload(state, part)
    cfg = state.config.files
    try:
        await state.files.store.write(name, upload.checked(), cfg.max_bytes)
    except TooLarge as e:
        raise PayloadTooLarge(
            f"the file exceeds the limit of {cfg.max_bytes} bytes (files.max_bytes)",
            param="file",
        ) from e
    except LineError as e:
        raise BadRequest(str(e), param=e.param, code="invalid_batch_line") from e
    if not upload.lines:
        raise BadRequest(
            "the file holds no request: a batch input file needs at least one line",
            param="file",
            code="empty_file",
        )
    return upload


async def create_file(request: web.Request) -> web.Response:
    """``POST /v1/files``: ``multipart/form-data`` with ``purpose`` and ``file``."""
    state = request.app[STATE]
    tenant = (await identify(request, state)).tenant
    cfg = state.config.files
    if request.content_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type must be multipart/form-data, got {request.content_type!r}"
        )
    if request.content_length is not None and request.content_length > cfg.max_bytes + _OVERHEAD:
        raise PayloadTooLarge(
            f"the file exceeds the limit of {cfg.max_bytes} bytes (files.max_bytes)",
            param="file",
        )
    try:
        reader = await request.multipart()
    except (ValueError, KeyError) as e:
        raise _malformed(e) from e

    file_id = new_file_id()
    name = f"files/{file_id}"
    purpose: str | None = None
    upload: _Upload | None = None
    filename = ""
    fields = 0
    written = False
    try:
        for _ in range(_MAX_PARTS + 1):  # the last call finds the end
            try:
                part = await reader.next()
            except _READ_ERRORS as e:
                raise _malformed(e) from e
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not supported", code="invalid_body")
            if part.name == "file":
                if upload is not None:
                    raise BadRequest("the form holds more than one 'file'", param="file")
                filename = (part.filename or "file")[:_MAX_FILENAME]
                written = True
                upload = await _store(state, part, name)
                continue
            value = await _field(part, _MAX_FIELDS_BYTES - fields)
            fields += len(value)
            if part.name == "purpose":
                try:
                    purpose = value.decode()
                except UnicodeDecodeError:
                    purpose = value.decode("latin-1")
                _check_purpose(purpose)
            # Other fields (expires_after…) are read and ignored.
        else:
            raise BadRequest(f"the form has more than {_MAX_PARTS} parts", code="invalid_body")
        if purpose is None:
            raise BadRequest("Missing required parameter: 'purpose'.", param="purpose")
        if upload is None:
            raise BadRequest("Missing required parameter: 'file'.", param="file")
        _check_purpose(purpose)
        rec = FileRecord(
            id=file_id,
            tenant=tenant,
            purpose=purpose,
            filename=filename,
            bytes=upload.size,
            created_at=int(time.time()),
        )
        await redis_call(state, "files", "", state.files.save(rec))
    except BaseException:
        if written:  # whatever was written goes (a store that failed midway may leave some)
            await asyncio.shield(_forget(state, name))
        raise
    log.info("file %s uploaded: %d bytes, %d lines", file_id, upload.size, upload.lines)
    return json_response(rec.public())


async def _forget(state: State, name: str) -> None:
    try:
        await state.files.store.delete(name)
    except Exception:
        log.exception("could not delete %s after a failed upload", name)


# ---------------------------------------------------------------- reading


async def _file(request: web.Request, state: State) -> FileRecord:
    tenant = (await identify(request, state)).tenant
    file_id = request.match_info["file_id"]
    rec = await redis_call(state, "files", "", state.files.get(tenant, file_id))
    if rec is None:
        raise NotFound(f"No such File object: {file_id[:100]}", param="id")
    return rec


async def list_files(request: web.Request) -> web.Response:
    """``GET /v1/files``: the caller's files, newest first (``purpose``, ``limit``,
    ``after``: the last id of the previous page)."""
    state = request.app[STATE]
    tenant = (await identify(request, state)).tenant
    limit = limit_query(request, MAX_LIST_LIMIT, MAX_LIST_LIMIT)
    purpose = request.query.get("purpose") or None
    after = request.query.get("after") or None
    files = state.files
    if after is not None and await redis_call(state, "files", "", files.get(tenant, after)) is None:
        raise BadRequest(f"after: no file with id {after[:100]!r}", param="after")
    data: list[FileRecord] = []
    cursor = after
    more = False
    # A purpose filter may skip many files: it scans a bounded number of pages.
    for _ in range(_MAX_LIST_PAGES):
        recs, more = await redis_call(state, "files", "", files.list(tenant, cursor, limit))
        for i, rec in enumerate(recs):
            if purpose is None or rec.purpose == purpose:
                data.append(rec)
                if len(data) == limit:
                    more = more or i + 1 < len(recs)
                    break
        if len(data) == limit or not more:
            break
        if recs:
            cursor = recs[-1].id
    return json_response(
        {
            "object": "list",
            "data": [rec.public() for rec in data],
            "first_id": data[0].id if data else None,
            "last_id": data[-1].id if data else None,
            "has_more": more,
        }
    )


async def retrieve_file(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response((await _file(request, state)).public())


async def file_content(request: web.Request) -> web.StreamResponse:
    """The file's bytes, streamed from the store."""
    state = request.app[STATE]
    rec = await _file(request, state)
    chunks = state.files.content(rec)
    try:
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = b""
        except FileNotFoundError as e:
            raise NotFound(f"the contents of file {rec.id} are gone", param="id") from e
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if not rec.segments:
            response.content_length = rec.bytes
        await response.prepare(request)
        try:
            await response.write(first)
            async for chunk in chunks:
                await response.write(chunk)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            # Too late for an error object: the client sees the answer cut short.
            log.exception("file %s: reading its contents failed midway", rec.id)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


async def delete_file(request: web.Request) -> web.Response:
    state = request.app[STATE]
    rec = await _file(request, state)
    await redis_call(state, "files", "", state.files.delete(rec))
    return json_response({"id": rec.id, "object": "file", "deleted": True})
