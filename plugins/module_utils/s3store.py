# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kmod_archive S3 store (boto3). Any S3-compatible endpoint.

- Credentials: options, else boto3's own chain (environment, profile, instance role).
- Uploads: ``upload_file`` (multipart above 64 MiB, parts in parallel; on any error boto3's
  transfer manager aborts the multipart upload, so a partial object is never visible).
- Metadata: ``x-amz-meta-sha256`` (archive) and ``x-amz-meta-manifest-sha256`` (build content).
- Leases: ``PutObject`` with ``If-None-Match: *`` (create) and ``If-Match: <etag>`` (takeover),
  ``DeleteObject`` with ``If-Match`` (release). A store that ignores the conditions cannot lock.
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Any, Optional

from ansible_collections.modulus.kmods.plugins.module_utils.stores import MAX_SMALL, ObjectInfo, Store, StoreError

BOTO3_IMPORT_ERROR: Optional[str] = None
try:
    import boto3
    import boto3.exceptions
    import botocore.exceptions
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
except ImportError:  # pragma: no cover - exercised by the module's missing_required_lib path
    BOTO3_IMPORT_ERROR = traceback.format_exc()
    HAS_BOTO3 = False
else:
    HAS_BOTO3 = True

MULTIPART_THRESHOLD = 64 << 20
MULTIPART_CHUNKSIZE = 16 << 20
MAX_CONCURRENCY = 10

_FRIENDLY = {
    "NoSuchBucket": "the bucket does not exist",
    "InvalidAccessKeyId": "the access key is not known to the store (check access_key / profile)",
    "SignatureDoesNotMatch": "the request signature does not match (wrong secret_key for this access_key)",
    "AccessDenied": "access denied (the credentials lack permission)",
    "403": "access denied or wrong credentials (HTTP 403; check access_key / secret_key / profile)",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "PermanentRedirect": "the bucket is in another region (set region)",
}


def _client_config(options: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {
        "s3": {"addressing_style": options.get("addressing_style") or "auto"},
        "connect_timeout": options.get("connect_timeout") or 10,
        "read_timeout": max(60, int(options.get("connect_timeout") or 10)),
        "retries": {"max_attempts": int(options.get("max_attempts") or 3), "mode": "standard"},
        "max_pool_connections": MAX_CONCURRENCY + 2,
    }
    for name in ("request_checksum_calculation", "response_checksum_validation"):
        if options.get(name):
            kwargs[name] = options[name]
    return Config(**kwargs)


class S3Store(Store):
    kind = "s3"
    writable = True
    supports_lock = True

    def __init__(self, url: str, bucket: str, prefix: str, options: dict[str, Any]) -> None:
        super().__init__(url, prefix)
        if not HAS_BOTO3:
            raise StoreError(f"store {url} needs the Python library boto3 on the managed host")
        self.bucket = bucket
        self._bucket_seen = False
        self.endpoint = options.get("endpoint_url")
        self.where = "{}{}".format(url, f" at {self.endpoint}" if self.endpoint else "")
        self.extra: dict[str, Any] = {}
        if options.get("encryption"):
            self.extra["ServerSideEncryption"] = options["encryption"]
            if options["encryption"] == "aws:kms" and options.get("encryption_kms_key_id"):
                self.extra["SSEKMSKeyId"] = options["encryption_kms_key_id"]
        try:
            session = boto3.session.Session(
                aws_access_key_id=options.get("access_key"),
                aws_secret_access_key=options.get("secret_key"),
                aws_session_token=options.get("session_token"),
                region_name=options.get("region"),
                profile_name=options.get("profile"),
            )
            verify: Any = options.get("aws_ca_bundle") or options.get("validate_certs", True)
            self.client = session.client("s3", endpoint_url=self.endpoint, verify=verify,
                                         config=_client_config(options))
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreError(f"store {self.where}: cannot configure the S3 client: {exc}") from None
        self.client.meta.events.register("before-send.s3", self._count)
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE,
                                       max_concurrency=MAX_CONCURRENCY, use_threads=True)

    def _count(self, **_kwargs: Any) -> None:
        self.requests += 1

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, action: str, key: str) -> StoreError:
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            text = _FRIENDLY.get(code) or "{} (HTTP {})".format(code or "error", status)
            return StoreError(f"store {self.where}: {action} {key} failed: {text}")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return StoreError(f"store {self.where}: no credentials found (set access_key/secret_key, profile, "
                              "the AWS_* environment or an instance role)")
        if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
            return StoreError(f"store {self.where} is unreachable: {exc}")
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            return StoreError(f"store {self.where}: {action} {key} failed: {exc}")
        return StoreError(f"store {self.where}: {action} {key} failed: {exc}")

    def _missing_bucket(self) -> bool:
        if self._bucket_seen:
            return False
        try:
            self.client.head_bucket(Bucket=self.bucket)
            self._bucket_seen = True
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return status == 404
        except (botocore.exceptions.BotoCoreError, OSError):
            return False
        return False

    def _explain_403(self, key: str, exc: Exception) -> Exception:
        """A HEAD error has no body: ask once more with a 1-byte GET to learn the S3 error code."""
        try:
            self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range="bytes=0-0")
        except botocore.exceptions.ClientError as detailed:
            if detailed.response.get("Error", {}).get("Code") not in (None, "", "403"):
                return detailed
        except (botocore.exceptions.BotoCoreError, OSError):
            pass
        return exc

    def head(self, key: str) -> Optional[ObjectInfo]:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                if self._missing_bucket():
                    raise StoreError(f"store {self.where}: bucket {self.bucket} does not exist (NoSuchBucket)") from None
                return None
            if status == 403:
                exc = self._explain_403(key, exc)
            raise self._error(exc, "HEAD", key) from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._error(exc, "HEAD", key) from None
        meta = resp.get("Metadata", {})
        return ObjectInfo(key, int(resp.get("ContentLength", 0)), meta.get("sha256"), meta.get("manifest-sha256"),
                          resp.get("ETag"))

    def download(self, key: str, path: str) -> None:
        try:
            self.client.download_file(self.bucket, self._key(key), path, Config=self.transfer)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._error(exc, "GET", key) from None

    def upload(self, path: str, key: str, sha256: str, manifest_sha256: str, size: int) -> None:
        extra = dict(self.extra)
        extra["Metadata"] = {"sha256": sha256, "manifest-sha256": manifest_sha256}
        extra["ContentType"] = "application/gzip"
        try:
            self.client.upload_file(path, self.bucket, self._key(key), ExtraArgs=extra, Config=self.transfer)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._error(exc, "PUT", key) from None
        except boto3.exceptions.S3UploadFailedError as exc:
            raise StoreError(f"store {self.where}: PUT {key} failed: {_upload_reason(exc)}") from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._error(exc, "DELETE", key) from None

    def get_small(self, key: str) -> Optional[bytes]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            if int(resp.get("ContentLength") or 0) > MAX_SMALL:
                raise StoreError(f"store {self.where}: {key} is larger than {MAX_SMALL} bytes")
            return resp["Body"].read(MAX_SMALL + 1)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(exc, "GET", key) from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._error(exc, "GET", key) from None

    def put_small(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType="text/plain",
                                   **self.extra)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._error(exc, "PUT", key) from None

    @staticmethod
    def _precondition_failed(exc: Exception) -> bool:
        if not isinstance(exc, botocore.exceptions.ClientError):
            return False
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = exc.response.get("Error", {}).get("Code")
        return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")

    def create_exclusive(self, key: str, data: bytes) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*",
                                   ContentType="application/json", **self.extra)
        except botocore.exceptions.ClientError as exc:
            if self._precondition_failed(exc):
                return False
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 501:
                raise StoreError(f"store {self.where} does not support conditional writes (If-None-Match): "
                                 "it cannot hold a fleet lock") from None
            raise self._error(exc, "PUT (lease)", key) from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._error(exc, "PUT (lease)", key) from None
        return True

    def read_small(self, key: str) -> Optional[tuple[bytes, str]]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read(), resp["ETag"]
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(exc, "GET (lease)", key) from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._error(exc, "GET (lease)", key) from None

    def replace_if_match(self, key: str, data: bytes, etag: str) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=etag,
                                   ContentType="application/json", **self.extra)
        except botocore.exceptions.ClientError as exc:
            if self._precondition_failed(exc) or exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                return False
            raise self._error(exc, "PUT (lease takeover)", key) from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._error(exc, "PUT (lease takeover)", key) from None
        return True

    def delete_if_match(self, key: str, etag: str) -> bool:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key), IfMatch=etag)
        except botocore.exceptions.ClientError as exc:
            if self._precondition_failed(exc) or exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                return False
            raise self._error(exc, "DELETE (lease)", key) from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._error(exc, "DELETE (lease)", key) from None
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort
            self.client.close()


def _upload_reason(exc: Exception) -> str:
    text = str(exc)
    for code, friendly in _FRIENDLY.items():
        if code in text:
            return friendly
    return text
