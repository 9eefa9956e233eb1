"""The archive's bucket over the S3 API (boto3): put, get, list and delete objects, with two typed errors
that say whether waiting helps (:class:`StoreUnavailable`) or someone has to act (:class:`StoreRefused`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from consumers.settings import ArchiveSettings

__all__ = ["ArchiveError", "Store", "StoreRefused", "StoreUnavailable", "open_store"]

# S3 error codes that a retry later may cure; any other refusal (AccessDenied, NoSuchBucket, a bad
# signature) needs a person.
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "500",
    "502",
    "503",
    "504",
}


class ArchiveError(RuntimeError):
    """An archive operation failed; ``code`` is the S3 error code or the connection failure's kind."""

    reason = "error"

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class StoreUnavailable(ArchiveError):
    """The store did not answer, or answered that it is busy: the next run tries again."""

    reason = "unavailable"


class StoreRefused(ArchiveError):
    """The store refused the request (credentials, permissions, missing bucket): fix the configuration."""

    reason = "refused"


class Store:
    """One bucket (and key prefix) of an S3-compatible store. ``client``: a boto3 S3 client."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put_file(self, key: str, path: Path) -> None:
        # upload_file splits a large file into a multipart upload by itself.
        self._call("put", key, self._client.upload_file, str(path), self.bucket, key)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json") -> None:
        self._call(
            "put",
            key,
            self._client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
        )

    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes; None when there is no such key."""
        from botocore.exceptions import ClientError

        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=key)
            return bytes(answer["Body"].read())
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise _translate("get", key, exc) from exc
        except Exception as exc:
            raise _translate("get", key, exc) from exc

    def get_file(self, key: str, path: Path) -> None:
        self._call("get", key, self._client.download_file, self.bucket, key, str(path))

    def keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix``, in key order."""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    yield str(item["Key"])
        except Exception as exc:
            raise _translate("list", prefix, exc) from exc

    def ensure_bucket(self) -> bool:
        """Create the bucket when it does not exist; True when this created it."""
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise _translate("head", self.bucket, exc) from exc
        except Exception as exc:
            raise _translate("head", self.bucket, exc) from exc
        self._call("create", self.bucket, self._client.create_bucket, Bucket=self.bucket)
        return True

    def delete(self, key: str) -> None:
        self._call("delete", key, self._client.delete_object, Bucket=self.bucket, Key=key)

    def _call(self, what: str, key: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            raise _translate(what, key, exc) from exc


def open_store(settings: ArchiveSettings) -> Store:
    """The configured bucket; raises ValueError when the archive is off (no AIMA_ARCHIVE_BUCKET)."""
    if settings.bucket is None:
        raise ValueError("the archive is off: set AIMA_ARCHIVE_BUCKET (and AIMA_ARCHIVE_ENDPOINT_URL)")
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=settings.region,
        connect_timeout=settings.timeout_s,
        read_timeout=settings.timeout_s,
        # A failed run is retried by the next retention run; a few quick retries cover a blip.
        retries={"max_attempts": 3, "mode": "standard"},
        # Path-style URLs and checksums only where S3 requires them: what S3-compatible stores (SeaweedFS,
        # MinIO) accept.
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    secret = settings.secret_access_key
    key_id = settings.access_key_id
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=key_id.get_secret_value() if key_id else None,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=config,
    )
    return Store(client, settings.bucket, settings.prefix or "")


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {}) if isinstance(response, dict) else {}
    return str(error.get("Code", "") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _translate(what: str, key: str, exc: Exception) -> ArchiveError:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ArchiveError):
        return exc
    if isinstance(exc, ClientError):
        code = _code(exc)
        kind = StoreUnavailable if code in _TRANSIENT_CODES else StoreRefused
        return kind(f"{what} {key}: the store answered {code}: {exc}", code)
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
        # upload_file raises this while handling the ClientError of the part that failed.
        return _translate(what, key, exc.__context__)
    if isinstance(exc, ConnectionError | HTTPClientError):
        return StoreUnavailable(f"{what} {key}: the store does not answer: {exc}", type(exc).__name__)
    if isinstance(exc, BotoCoreError):
        # NoCredentialsError, a bad endpoint URL and the like: configuration.
        return StoreRefused(f"{what} {key}: {exc}", type(exc).__name__)
    return ArchiveError(f"{what} {key}: {exc}", type(exc).__name__)
