"""How the archive's store names a failure (consumers/archive/store.py): waiting helps (StoreUnavailable)
or someone has to act (StoreRefused); retention holds the drop back either way, the metric says which."""

from __future__ import annotations

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from consumers.archive.store import ArchiveError, StoreRefused, StoreUnavailable, _translate


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("error", "kind", "code"),
    [
        (_client_error("AccessDenied", 403), StoreRefused, "AccessDenied"),
        (_client_error("NoSuchBucket", 404), StoreRefused, "NoSuchBucket"),
        (_client_error("SignatureDoesNotMatch", 403), StoreRefused, "SignatureDoesNotMatch"),
        (_client_error("SlowDown", 503), StoreUnavailable, "SlowDown"),
        (_client_error("InternalError", 500), StoreUnavailable, "InternalError"),
        (
            EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
            StoreUnavailable,
            "EndpointConnectionError",
        ),
        (NoCredentialsError(), StoreRefused, "NoCredentialsError"),
    ],
)
def test_each_failure_is_named(error: Exception, kind: type[ArchiveError], code: str) -> None:
    translated = _translate("put", "gpu_samples/day=2026-12-01/part-x.parquet", error)
    assert type(translated) is kind and translated.code == code
    assert "gpu_samples/day=2026-12-01" in str(translated)
    assert translated.reason == ("refused" if kind is StoreRefused else "unavailable")


def test_a_failed_upload_is_named_by_the_error_it_carries() -> None:
    try:
        try:
            raise _client_error("AccessDenied", 403)
        except ClientError as exc:
            raise S3UploadFailedError(f"Failed to upload: {exc}") from None
    except S3UploadFailedError as upload:
        # upload_file raises it while handling the ClientError; `from None` still keeps the context.
        translated = _translate("put", "k", upload)
    assert type(translated) is StoreRefused and translated.code == "AccessDenied"
