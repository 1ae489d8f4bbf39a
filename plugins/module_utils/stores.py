# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kmod_archive stores: where archives live. ``file:///dir`` and read-only ``http(s)://`` here,
``s3://bucket/prefix`` in ``s3store.py`` (boto3, imported only when an S3 store is used).

Every store offers the same small interface (``Store``); ``requests`` counts the requests a
store made (HTTP requests for s3/http, object reads/writes for file) so callers can prove
idempotence. Error messages name the store (URL without credentials) and the problem, never a
secret. Metadata of an archive: S3 object metadata ``sha256`` / ``manifest-sha256``
(``x-amz-meta-*``); for file and http stores a sidecar ``<key>.json`` beside the archive."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
from typing import Any, Optional

from ansible.module_utils.urls import open_url

from ansible_collections.modulus.kmods.plugins.module_utils.fsutil import atomic_copy, atomic_write

META_SUFFIX = ".json"
MAX_SMALL = 1 << 20  # a signature or a lease; anything larger is refused


class StoreError(Exception):
    """A store could not do what was asked; the message is safe to show (no secrets)."""


class ObjectInfo:
    """What a HEAD tells about an archive."""

    def __init__(self, key: str, size: int, sha256: Optional[str] = None,
                 manifest_sha256: Optional[str] = None, etag: Optional[str] = None, legacy: bool = False) -> None:
        self.key = key
        self.legacy = legacy
        self.size = size
        self.sha256 = sha256
        self.manifest_sha256 = manifest_sha256
        self.etag = etag


class Store:
    """Interface of a store. Keys are '/'-separated, relative to the store's prefix."""

    kind = "none"
    writable = False
    supports_lock = False

    def __init__(self, url: str, prefix: str = "") -> None:
        self.url = url
        self.prefix = prefix
        self.requests = 0

    # archives
    def head(self, key: str) -> Optional[ObjectInfo]:
        raise NotImplementedError

    def download(self, key: str, path: str) -> None:
        """Write the object to the new file ``path`` (the caller removes it on failure)."""
        raise NotImplementedError

    def upload(self, path: str, key: str, sha256: str, manifest_sha256: str, size: int) -> None:
        """Publish ``path`` at ``key`` atomically (visible complete or not at all)."""
        raise StoreError(f"store {self.url} is read-only: cannot upload {key}")

    def delete(self, key: str) -> None:
        raise StoreError(f"store {self.url} is read-only: cannot delete {key}")

    # small objects beside an archive (its signature ``<key>.sig``)
    def get_small(self, key: str) -> Optional[bytes]:
        """The content of a small object (at most ``MAX_SMALL`` bytes), None when it does not exist."""
        raise NotImplementedError

    def put_small(self, key: str, data: bytes) -> None:
        """Write a small object atomically."""
        raise StoreError(f"store {self.url} is read-only: cannot write {key}")

    # leases (small objects with compare-and-swap)
    def create_exclusive(self, key: str, data: bytes) -> bool:
        raise StoreError(f"store {self.url} cannot hold a lock (read-only)")

    def read_small(self, key: str) -> Optional[tuple[bytes, str]]:
        raise StoreError(f"store {self.url} cannot hold a lock (read-only)")

    def replace_if_match(self, key: str, data: bytes, etag: str) -> bool:
        raise StoreError(f"store {self.url} cannot hold a lock (read-only)")

    def delete_if_match(self, key: str, etag: str) -> bool:
        raise StoreError(f"store {self.url} cannot hold a lock (read-only)")

    def close(self) -> None:
        """Release connections."""


def split_store_url(url: str) -> tuple[str, str, str]:
    """('s3'|'file'|'http'|'https', location, prefix). location: bucket, directory or base URL."""
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"store={url!r}: an s3 store needs a bucket (s3://bucket/prefix)")
        return "s3", parsed.netloc, parsed.path.strip("/")
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"store={url!r}: a file store must be file:///absolute/dir")
        path = urllib.parse.unquote(parsed.path)
        if not path.startswith("/"):
            raise StoreError(f"store={url!r}: a file store must be file:///absolute/dir")
        return "file", path, ""
    if scheme in ("http", "https"):
        if parsed.username or parsed.password:
            raise StoreError("store: credentials in an http(s) store URL are not supported")
        return scheme, url.rstrip("/"), ""
    raise StoreError(f"store={url!r}: unsupported scheme (use s3://bucket/prefix, file:///dir or https://host/path)")


def open_store(url: Optional[str], options: Optional[dict[str, Any]] = None) -> Optional[Store]:
    """Open the store named by ``url`` (None or '' -> no store)."""
    if not url:
        return None
    scheme, location, prefix = split_store_url(url)
    if scheme == "s3":
        from ansible_collections.modulus.kmods.plugins.module_utils.s3store import S3Store
        return S3Store(url, location, prefix, options or {})
    if scheme == "file":
        return FileStore(url, location)
    return HttpStore(url, location, options or {})


def _meta_bytes(sha256: str, manifest_sha256: str, size: int) -> bytes:
    return (json.dumps({"sha256": sha256, "manifest_sha256": manifest_sha256, "size": size}, sort_keys=True) + "\n").encode()


def _parse_meta(data: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


# --------------------------------------------------------------------------- file://

class FileStore(Store):
    """A local or shared directory. Uploads: temp file + fsync + rename. Lease: link() create,
    compare-and-swap under an flock on ``<lease>.guard``."""

    kind = "file"
    writable = True
    supports_lock = True

    def __init__(self, url: str, root: str) -> None:
        super().__init__(url)
        self.root = root
        if not os.path.isdir(root):
            raise StoreError(f"store {url}: directory {root} does not exist")

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"store {self.url}: invalid key {key!r}")
        return os.path.join(self.root, *parts)

    def head(self, key: str) -> Optional[ObjectInfo]:
        self.requests += 1
        path = self._path(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        meta: dict[str, Any] = {}
        try:
            with open(path + META_SUFFIX, "rb") as handle:
                meta = _parse_meta(handle.read())
        except FileNotFoundError:
            pass
        return ObjectInfo(key, st.st_size, meta.get("sha256"), meta.get("manifest_sha256"),
                          f"{st.st_ino}-{st.st_mtime_ns}")

    def download(self, key: str, path: str) -> None:
        self.requests += 1
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise StoreError(f"store {self.url}: {key} does not exist") from None

    def upload(self, path: str, key: str, sha256: str, manifest_sha256: str, size: int) -> None:
        self.requests += 1
        target = self._path(key)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            atomic_copy(path, target)
            atomic_write(target + META_SUFFIX, _meta_bytes(sha256, manifest_sha256, size))
        except OSError as exc:
            raise StoreError(f"store {self.url}: cannot write {key}: {exc.strerror or exc}") from None

    def delete(self, key: str) -> None:
        self.requests += 1
        for path in (self._path(key), self._path(key) + META_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def get_small(self, key: str) -> Optional[bytes]:
        self.requests += 1
        try:
            with open(self._path(key), "rb") as handle:
                data = handle.read(MAX_SMALL + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"store {self.url}: cannot read {key}: {exc.strerror or exc}") from None
        if len(data) > MAX_SMALL:
            raise StoreError(f"store {self.url}: {key} is larger than {MAX_SMALL} bytes")
        return data

    def put_small(self, key: str, data: bytes) -> None:
        self.requests += 1
        target = self._path(key)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            atomic_write(target, data)
        except OSError as exc:
            raise StoreError(f"store {self.url}: cannot write {key}: {exc.strerror or exc}") from None

    def create_exclusive(self, key: str, data: bytes) -> bool:
        self.requests += 1
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # write the content first, then link it into place: the lease never appears empty
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.new-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, path)  # atomic create-if-absent (O_EXCL semantics, also on NFS)
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)

    def read_small(self, key: str) -> Optional[tuple[bytes, str]]:
        self.requests += 1
        try:
            with open(self._path(key), "rb") as handle:
                st = os.fstat(handle.fileno())
                return handle.read(), f"{st.st_ino}-{st.st_mtime_ns}"
        except FileNotFoundError:
            return None

    def _guard(self, key: str) -> int:
        fd = os.open(self._path(key) + ".guard", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _etag(self, path: str) -> Optional[str]:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return f"{st.st_ino}-{st.st_mtime_ns}"

    def replace_if_match(self, key: str, data: bytes, etag: str) -> bool:
        self.requests += 1
        fd = self._guard(key)
        try:
            if self._etag(self._path(key)) != etag:
                return False
            atomic_write(self._path(key), data)
            return True
        finally:
            os.close(fd)

    def delete_if_match(self, key: str, etag: str) -> bool:
        self.requests += 1
        fd = self._guard(key)
        try:
            if self._etag(self._path(key)) != etag:
                return False
            os.unlink(self._path(key))
            return True
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- http(s):// read-only

class HttpStore(Store):
    """Unauthenticated GET of a public bucket or mirror. The archive's sha256 comes from the
    ``x-amz-meta-sha256`` header (public S3 buckets send it) or else the ``<key>.json`` sidecar."""

    kind = "http"

    def __init__(self, url: str, base: str, options: dict[str, Any]) -> None:
        super().__init__(url)
        self.base = base
        self.timeout = float(options.get("connect_timeout") or 30)
        self.validate_certs = options.get("validate_certs") is not False
        self.ca_path = options.get("aws_ca_bundle")

    def _url(self, key: str) -> str:
        return f"{self.base}/{urllib.parse.quote(key)}"

    def _open(self, url: str, method: str = "GET") -> Any:
        self.requests += 1
        try:
            return open_url(url, method=method, timeout=self.timeout, validate_certs=self.validate_certs,
                            ca_path=self.ca_path, http_agent="modulus.kmods/kmod_archive", follow_redirects="safe")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise StoreError(f"store {self.url}: {method} {url} answered HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, socket.timeout, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StoreError(f"store {self.url} is unreachable ({method} {url}): {reason}") from None

    def head(self, key: str) -> Optional[ObjectInfo]:
        resp = self._open(self._url(key), "HEAD")
        if resp is None:
            return None
        with resp:
            size = int(resp.headers.get("Content-Length") or -1)
            sha = resp.headers.get("x-amz-meta-sha256")
            msha = resp.headers.get("x-amz-meta-manifest-sha256")
            etag = resp.headers.get("ETag")
        if not sha:
            side = self._open(self._url(key + META_SUFFIX))
            if side is not None:
                with side:
                    meta = _parse_meta(side.read(65536))
                sha, msha = meta.get("sha256"), meta.get("manifest_sha256")
        return ObjectInfo(key, size, sha, msha, etag)

    def get_small(self, key: str) -> Optional[bytes]:
        resp = self._open(self._url(key))
        if resp is None:
            return None
        try:
            with resp:
                data = resp.read(MAX_SMALL + 1)
        except (OSError, socket.timeout) as exc:
            raise StoreError(f"store {self.url}: GET {key} failed: {exc}") from None
        if len(data) > MAX_SMALL:
            raise StoreError(f"store {self.url}: {key} is larger than {MAX_SMALL} bytes")
        return data

    def download(self, key: str, path: str) -> None:
        resp = self._open(self._url(key))
        if resp is None:
            raise StoreError(f"store {self.url}: {key} does not exist")
        try:
            with resp, open(path, "wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
        except (OSError, socket.timeout) as exc:
            raise StoreError(f"store {self.url}: download of {key} failed: {exc}") from None


# The options shared by every module that talks to a store (documented in
# plugins/doc_fragments/store.py; names follow amazon.aws).
STORE_ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "store": {"type": "str"},
    "endpoint_url": {"type": "str", "aliases": ["aws_endpoint_url"]},
    "access_key": {"type": "str", "aliases": ["aws_access_key_id", "aws_access_key"], "no_log": False},
    "secret_key": {"type": "str", "aliases": ["aws_secret_access_key", "aws_secret_key"], "no_log": True},
    "session_token": {"type": "str", "aliases": ["aws_session_token"], "no_log": True},
    "profile": {"type": "str", "aliases": ["aws_profile"]},
    "region": {"type": "str", "aliases": ["aws_region"]},
    "validate_certs": {"type": "bool", "default": True},
    "aws_ca_bundle": {"type": "path"},
    "addressing_style": {"type": "str", "choices": ["auto", "path", "virtual"], "default": "auto"},
    "encryption": {"type": "str", "choices": ["AES256", "aws:kms"]},
    "encryption_kms_key_id": {"type": "str"},
    "request_checksum_calculation": {"type": "str", "choices": ["when_supported", "when_required"]},
    "response_checksum_validation": {"type": "str", "choices": ["when_supported", "when_required"]},
    "connect_timeout": {"type": "int", "default": 10},
    "max_attempts": {"type": "int", "default": 3},
}
