"""A file store in S3-compatible object storage (AWS S3, MinIO, Ceph, ...), through
aiobotocore (the ``s3`` extra: ``pip install 'llm-broker[s3]'``).

Each name is the object ``cfg.prefix + name`` in ``cfg.bucket``. A write streams:
it is buffered and sent a part of :data:`PART` bytes at a time (a multipart upload:
memory holds about two parts, whatever the file's size); a file smaller than one
part is a single PutObject.
S3 makes an object visible only once it is complete, so a reader never sees half a
file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session
    from botocore.exceptions import ClientError
except ImportError as exc:  # pragma: no cover - the image or venv lacks the extra
    raise ImportError("files.backend s3 needs aiobotocore: pip install 'llm-broker[s3]'") from exc

from llm_broker.shared.config import S3Config
from llm_broker.shared.files import CHUNK, TooLarge

if TYPE_CHECKING:  # types-aiobotocore[s3] (the test extra); not needed at run time
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger("llm_broker.files")

#: The size of the parts of a multipart upload (S3's minimum is 5 MiB, but for the last).
PART = 8 * 1024 * 1024
#: S3 takes at most this many parts in one upload.
MAX_PARTS = 10_000


def _read_secret(path: str) -> str:
    return Path(path).read_text().strip()


class S3Store:
    """Files as objects in an S3 bucket (see the module's docstring)."""

    def __init__(self, cfg: S3Config) -> None:
        if (cfg.access_key_id_file is None) != (cfg.secret_access_key_file is None):
            raise ValueError("files.s3: access_key_id_file and secret_access_key_file go together")
        self.cfg = cfg
        self._client: S3Client | None = None
        self._stack: AsyncExitStack | None = None
        self._lock = asyncio.Lock()

    def _key(self, name: str) -> str:
        if not name:
            raise ValueError("an empty file name")
        return self.cfg.prefix + name

    async def _s3(self) -> S3Client:
        """The client, created on first use (one per store, closed by :meth:`close`)."""
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                cfg = self.cfg
                # Without the files: botocore's chain (environment, shared files, role).
                key_id: str | None = None
                secret: str | None = None
                if cfg.access_key_id_file and cfg.secret_access_key_file:
                    key_id = await asyncio.to_thread(_read_secret, cfg.access_key_id_file)
                    secret = await asyncio.to_thread(_read_secret, cfg.secret_access_key_file)
                stack = AsyncExitStack()
                self._client = await stack.enter_async_context(
                    get_session().create_client(
                        "s3",
                        region_name=cfg.region,
                        endpoint_url=cfg.endpoint_url or None,
                        aws_access_key_id=key_id,
                        aws_secret_access_key=secret,
                        config=AioConfig(retries={"max_attempts": 3, "mode": "standard"}),
                    )
                )
                self._stack = stack
            return self._client

    async def write(self, name: str, chunks: AsyncIterable[bytes], max_bytes: int) -> int:
        s3 = await self._s3()
        bucket, key = self.cfg.bucket, self._key(name)
        # A part size that keeps the largest allowed file within S3's part count.
        part_size = max(PART, -(-max_bytes // MAX_PARTS))
        buf = bytearray()
        size = 0
        upload_id: str | None = None
        parts: list[CompletedPartTypeDef] = []
        finishing = False

        async def send_part(body: bytes) -> None:
            assert upload_id is not None
            number = len(parts) + 1
            sent = await s3.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )
            parts.append({"ETag": sent["ETag"], "PartNumber": number})

        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"the file is larger than {max_bytes} bytes")
                buf += chunk
                while len(buf) >= part_size:
                    if upload_id is None:
                        started = await s3.create_multipart_upload(Bucket=bucket, Key=key)
                        upload_id = started["UploadId"]
                    with memoryview(buf) as view:  # one copy of the part, not two
                        body = bytes(view[:part_size])
                    del buf[:part_size]
                    await send_part(body)
            finishing = True
            if upload_id is None:
                await s3.put_object(Bucket=bucket, Key=key, Body=bytes(buf))
            else:
                if buf:
                    await send_part(bytes(buf))
                buf.clear()
                await s3.complete_multipart_upload(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            # Nothing of this write may stay: the upload's parts (which S3 keeps, and
            # bills, until aborted) and, when the last call may have taken effect
            # (an error or a cancellation during it), the object: on an overwrite the
            # earlier version goes too, the name is left empty rather than uncertain.
            await self._clean_up(key, upload_id, delete=finishing)
            raise
        return size

    async def _clean_up(self, key: str, upload_id: str | None, delete: bool) -> None:
        s3 = await self._s3()
        bucket = self.cfg.bucket
        try:
            if upload_id is not None:
                await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            if delete:
                await s3.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            log.warning("files: cleaning up the failed upload of %s: %s", key, exc)

    async def read(self, name: str, start: int = 0) -> AsyncIterator[bytes]:
        s3 = await self._s3()
        key = self._key(name)
        extra: dict[str, Any] = {"Range": f"bytes={start}-"} if start else {}
        try:
            got = await s3.get_object(Bucket=self.cfg.bucket, Key=key, **extra)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"no file {name!r}") from None
            if code == "InvalidRange":  # start at or past the end: nothing more
                return
            raise
        async with got["Body"] as body:
            while chunk := await body.read(CHUNK):
                yield chunk

    async def delete(self, name: str) -> None:
        s3 = await self._s3()
        # S3 answers 204 whether the object was there or not.
        await s3.delete_object(Bucket=self.cfg.bucket, Key=self._key(name))

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()
