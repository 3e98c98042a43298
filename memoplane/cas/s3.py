"""The S3/MinIO backend: one object per name under `s3://bucket/prefix`, via the `minio` client.

Semantics (see Backend):
- put: a single S3 PUT, atomic (readers see the old object or the new one, never a part).
- put_if_absent: HEAD, then PUT when absent. Names are content addresses, so two racing
  writers PUT identical bytes: harmless, and cheaper than a conditional write that would
  have to compress and upload every deduplicated chunk first.
- create: one PUT with `If-None-Match: *`: the server refuses it (412 PreconditionFailed) when
  the name exists, atomically (S3, MinIO and versitygw, the last two tested), so of racing creators
  exactly one wins. A retried PUT whose first attempt succeeded is refused too: the caller compares
  what is there with its bytes.
- Age refresh for GC grace: an existing object is copied onto itself with REPLACE
  metadata, which moves its LastModified (what list() reports as mtime) to now. Measured
  on the local MinIO: HEAD ~1 ms, self-copy ~3 ms (the client HEADs the source once more).
  Chunks average 16 KiB, so a deduplicated 64 MiB blob is ~4000 objects: refreshing each
  one on every write would triple the cost of the common case. So an object is refreshed
  only when the HEAD shows it is older than `refresh_after` (default 60 s, measured on
  the server's own clock: Date minus Last-Modified, immune to client skew). Both are whole
  seconds, and a server may send a cached Date (versitygw's HTTP server refreshes it once a
  second), so Date can trail Last-Modified: the age is read `DATE_SLACK` seconds older than it
  looks, erring towards a refresh. A deduplicated object is therefore protected for at least
  `grace - refresh_after` seconds, and GC's grace period (default 1 h) must exceed
  `refresh_after` plus the longest write.
  A "touched" marker object was the alternative: it doubles the object count and GC
  would have to learn it, for no gain over a server-side copy.
  The bucket must not be versioned: each refresh would then keep another version.
- flush: a no-op. An S3 PUT is durable when it returns success, so a ref written after
  its data can never outlive it.
- Failures to reach the endpoint, bad credentials and a missing bucket raise
  StoreUnavailable naming the endpoint and the fix, never a urllib3 traceback.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Any, cast
from urllib.parse import urlparse

import certifi
import minio
import urllib3
from minio.commonconfig import REPLACE, CopySource
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import check_bucket_name

from ..errors import InputError, MemoplaneError, NotFound
from .backend import ObjectInfo

REFRESH_AFTER = 60.0  # seconds; see the module docstring
DATE_SLACK = 2.0  # seconds: HTTP dates are whole seconds and a Date header may be a second stale
DEFAULT_MAX_CONNECTIONS = 32
SINGLE_PUT_MAX = 1 << 30  # bytes sent in one PUT request (S3 allows 5 GiB; a pack is ~16 MiB)
_MISSING = ("NoSuchKey", "NoSuchObject")
# XAdminUserNotFound: versitygw's answer (a 404) to an access key it does not know.
_CREDENTIALS = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                "ExpiredToken", "XAdminUserNotFound")


class StoreUnavailable(MemoplaneError):
    """The object store cannot be reached or refuses us (network, credentials, bucket)."""


def parse_endpoint(endpoint: str, secure: bool | None = None) -> tuple[str, bool]:
    """("host:port", secure) from "http://host:port", "https://host" or "host:port".

    Without a scheme, `secure` decides (default True, as S3 itself)."""
    url = urlparse(endpoint if "://" in endpoint else f"//{endpoint}")
    if url.scheme not in ("", "http", "https") or not url.netloc or url.path not in ("", "/"):
        raise InputError(f"S3 endpoint {endpoint!r} is not host:port or http(s)://host:port",
                         "set MEMOPLANE_S3_ENDPOINT to e.g. http://minio.memoplane:9000")
    if url.scheme:
        is_tls = url.scheme == "https"
        if secure is not None and secure != is_tls:
            raise InputError(f"S3 endpoint {endpoint} says {url.scheme} but secure={secure}",
                             "drop the secure setting or make it match the scheme")
        return url.netloc, is_tls
    return url.netloc, True if secure is None else secure


def make_client(endpoint: str, access_key: str, secret_key: str, *, secure: bool | None = None,
                region: str | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> minio.Minio:
    """A minio client whose connection pool fits the Store's parallel chunk I/O.

    The client's default pool keeps 10 connections per host; the Store uploads and
    reads ahead from a thread pool, and every thread above the pool size would open
    and drop a connection per request. Retries are few and short so that a dead
    endpoint fails in about a second with StoreUnavailable rather than hanging.
    """
    host, tls = parse_endpoint(endpoint, secure)
    http = urllib3.PoolManager(
        maxsize=max_connections,
        block=False,
        timeout=urllib3.Timeout(connect=5.0, read=120.0),
        cert_reqs="CERT_REQUIRED",
        ca_certs=certifi.where(),
        retries=urllib3.Retry(total=3, connect=2, backoff_factor=0.1,
                              status_forcelist=[500, 502, 503, 504]),
    )
    return minio.Minio(host, access_key=access_key, secret_key=secret_key, secure=tls,
                       region=region, http_client=http)


class S3Backend:
    """Objects under `prefix` in `bucket`. Thread-safe (the client and its pool are)."""

    def __init__(self, client: minio.Minio, bucket: str, prefix: str = "", *,
                 refresh_after: float = REFRESH_AFTER) -> None:
        if refresh_after < 0:
            raise InputError(f"refresh_after={refresh_after} is negative", "use 0 (always) or more seconds")
        try:
            check_bucket_name(bucket)
        except ValueError as e:
            raise InputError(f"bucket name {bucket!r}: {e}",
                             "use 3-63 lowercase letters, digits, dots and hyphens") from None
        self.client = client
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.refresh_after = refresh_after
        base = client._base_url  # the client keeps no public accessor for its endpoint
        self.endpoint = f"{'https' if base.is_https else 'http'}://{base.host}"

    def _key(self, name: str) -> str:
        if not name or name.startswith("/") or "//" in name or any(p in (".", "..") for p in name.split("/")):
            raise InputError(f"object name {name!r} is not valid", "use slash-separated names without . or ..")
        return self.prefix + name

    # -- errors ------------------------------------------------------------------

    @contextmanager
    def _errors(self, op: str, name: str = "") -> Iterator[None]:
        """Translate client and network failures into errors that name the fix."""
        where = self.describe() + name
        try:
            yield
        except S3Error as e:
            if e.code == "NoSuchBucket":
                raise StoreUnavailable(f"{op} {where}: bucket {self.bucket!r} does not exist at {self.endpoint}",
                                       "create it (S3Backend.ensure_bucket(), or `mc mb`) or fix the "
                                       "store's bucket name") from None
            if e.code in _CREDENTIALS:
                raise StoreUnavailable(f"{op} {where}: {self.endpoint} refused the credentials ({e.code})",
                                       "check MEMOPLANE_S3_ACCESS_KEY / MEMOPLANE_S3_SECRET_KEY and the "
                                       "key's policy on the bucket") from None
            raise StoreUnavailable(f"{op} {where}: {self.endpoint} answered {e.code}: {e.message}",
                                   "check the object store's logs") from None
        except (ServerError, InvalidResponseError) as e:
            raise StoreUnavailable(f"{op} {where}: {self.endpoint} failed: {e}",
                                   "check that the endpoint is an S3 server and its logs") from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise StoreUnavailable(f"{op} {where}: cannot reach the object store at {self.endpoint} ({reason})",
                                   "start it (`hack/cluster up` locally) or set MEMOPLANE_S3_ENDPOINT "
                                   "to a reachable endpoint") from None
        except MinioException as e:
            raise StoreUnavailable(f"{op} {where}: {e}", "check the object store at " + self.endpoint) from None

    def ensure_bucket(self) -> bool:
        """Create the bucket if it does not exist; True if this call created it."""
        with self._errors("create bucket"):
            if self.client.bucket_exists(self.bucket):
                return False
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as e:
                if e.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # a racing creator
                    return False
                raise
            return True

    # -- the Backend protocol -------------------------------------------------------

    def put(self, name: str, data: bytes | bytearray) -> None:
        key = self._key(name)
        with self._errors("put", name):
            self._put(key, data)

    def put_if_absent(self, name: str, data: bytes | Callable[[], bytes]) -> bool:
        key = self._key(name)
        with self._errors("put", name):
            head = self._stat(key)
            if head is not None:
                if self._age(head) >= self.refresh_after:
                    self._refresh(key)
                return False
            self._put(key, data() if callable(data) else data)
            return True

    def _put(self, key: str, data: bytes | bytearray) -> None:
        """One PUT request up to SINGLE_PUT_MAX bytes. (The client's put_object makes anything over
        5 MiB a multipart upload: two more requests plus one per 5 MiB, and a copy of each part;
        a 16 MiB pack cost six requests.)"""
        if len(data) > SINGLE_PUT_MAX:
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data))
        else:
            # A pack arrives as a bytearray (packs.PackWriter fills it in place): the client only
            # hashes the body and hands it to urllib3, which sends any buffer; copying it to bytes
            # would hold the pack twice.
            self.client._put_object(bucket_name=self.bucket, object_name=key, data=cast(bytes, data),
                                    headers={"Content-Type": "application/octet-stream"})

    def create(self, name: str, data: bytes) -> bool:
        key = self._key(name)
        with self._errors("create", name):
            try:
                # put_object (minio 7.2) sends headers it does not know as user metadata
                # (x-amz-meta-if-none-match: no condition at all); the client's one-request PUT
                # sends them as given. Keyword arguments: the same call in minio's next major version.
                self.client._put_object(bucket_name=self.bucket, object_name=key, data=data,
                                        headers={"If-None-Match": "*"})
            except S3Error as e:
                if e.code == "PreconditionFailed":
                    return False
                raise
            return True

    def _stat(self, key: str) -> Any | None:
        try:
            return self.client.stat_object(self.bucket, key)
        except S3Error as e:
            if e.code in _MISSING:
                return None
            raise

    @staticmethod
    def _age(head: Any) -> float:
        """Seconds since the object was last written, on the server's clock, never under-estimated."""
        if head.last_modified is None:
            return float("inf")
        date = head.metadata.get("Date") if head.metadata is not None else None
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        return float(now - head.last_modified.timestamp()) + DATE_SLACK

    def _refresh(self, key: str) -> None:
        """Move LastModified to now: a server-side copy onto itself (S3 requires a
        metadata change for that, hence REPLACE with a fresh `touched` value)."""
        try:
            self.client.copy_object(self.bucket, key, CopySource(self.bucket, key),
                                    metadata={"x-amz-meta-memoplane-touched": f"{time.time():.3f}"},
                                    metadata_directive=REPLACE)
        except S3Error as e:
            if e.code not in _MISSING:  # deleted meanwhile (gc of an old copy): the caller rewrites
                raise

    def get(self, name: str) -> bytes:
        return self._read(name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes of the object from `offset`: one ranged GET (packs.read_range)."""
        return self._read(name, offset, length)

    def _read(self, name: str, offset: int = 0, length: int = 0) -> bytes:
        """One GET of the object, or of `length` bytes from `offset` if `length`; NotFound if absent."""
        with self._errors("get", name):
            try:
                response = self.client.get_object(self.bucket, self._key(name), offset=offset, length=length)
            except S3Error as e:
                if e.code in _MISSING:
                    raise NotFound(f"object {name} is not in the store at {self.describe()}") from None
                raise
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

    def exists(self, name: str) -> bool:
        key = self._key(name)
        with self._errors("stat", name):
            return self._stat(key) is not None

    def delete(self, name: str) -> None:
        key = self._key(name)
        with self._errors("delete", name):
            self.client.remove_object(self.bucket, key)  # S3 DELETE of an absent key succeeds

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose names start with `prefix`, in name order (S3 lists keys sorted)."""
        with self._errors("list", prefix):
            for obj in self.client.list_objects(self.bucket, prefix=self.prefix + prefix, recursive=True):
                if obj.is_dir or obj.object_name is None:
                    continue
                mtime = obj.last_modified.timestamp() if obj.last_modified else 0.0
                yield ObjectInfo(obj.object_name[len(self.prefix):], obj.size or 0, mtime)

    def flush(self) -> None:
        """Nothing to do: an S3 PUT is durable once it returns success."""

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"
