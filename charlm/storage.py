"""Fetching a corpus from a URI: ``s3://bucket/key``, ``https://…``, ``file://…`` or a path.

S3 goes through boto3 with the standard credential chain; when the chain finds no
credentials the request is sent unsigned (public buckets), and ``unsigned=True``
forces that. ``endpoint_url`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
read by boto3 itself) points at an S3-compatible store such as MinIO or Ceph.
Transient failures (throttling, 5xx, dropped connections) are retried with
exponential backoff; a missing bucket or key, denied access, an empty or
non-UTF-8 object fail at once with an error that names the URI.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from charlm.data import CorpusError, decode_corpus, read_corpus_bytes

DEFAULT_CORPUS_URI = "s3://text-datasets/nietzsche.txt"


class CorpusFetchError(CorpusError):
    """The corpus could not be fetched; the message names the URI and the reason.

    ``transient``: the failure may pass (connection refused or dropped, throttling, a 5xx)
    once the client's own retries are spent; bad input (no such key, denied) is not.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class FetchedCorpus:
    uri: str
    text: str = field(repr=False)
    raw: bytes = field(repr=False)
    size: int  # bytes
    sha256: str
    etag: str | None


def _digest(uri: str, raw: bytes, etag: str | None) -> FetchedCorpus:
    text = decode_corpus(raw, uri)
    return FetchedCorpus(
        uri=uri,
        text=text,
        raw=raw,
        size=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
        etag=etag.strip('"') if etag else None,
    )


def check_uri(uri: str) -> None:
    """Refuse, before any work, a URI that cannot name a corpus: an unsupported scheme, an S3 URI
    without a bucket and a key, a local path that does not exist or is a directory."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc or not parsed.path.lstrip("/"):
            raise CorpusFetchError(f"{uri}: expected s3://bucket/key")
    elif parsed.scheme in ("http", "https"):
        if not parsed.netloc:
            raise CorpusFetchError(f"{uri}: expected {parsed.scheme}://host/path")
    elif parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri)
        if path.is_dir():
            raise CorpusFetchError(f"{uri}: is a directory, expected a UTF-8 text file")
        if not path.exists():
            raise CorpusFetchError(f"{uri}: no such corpus file")
    else:
        raise CorpusFetchError(f"{uri}: unsupported scheme {parsed.scheme!r} (use s3://, https://, file:// or a path)")


def fetch_corpus(
    uri: str = DEFAULT_CORPUS_URI,
    *,
    endpoint_url: str | None = None,
    unsigned: bool | None = None,
    attempts: int = 5,
    backoff: float = 0.5,
    timeout: float = 30.0,
) -> FetchedCorpus:
    """Download and decode the corpus at ``uri``; see the module docstring."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        check_uri(uri)
    if parsed.scheme == "s3":
        return _fetch_s3(
            uri,
            parsed.netloc,
            parsed.path.lstrip("/"),
            endpoint_url=endpoint_url,
            unsigned=unsigned,
            attempts=attempts,
            timeout=timeout,
        )
    if parsed.scheme in ("http", "https"):
        return _fetch_http(uri, attempts=attempts, backoff=backoff, timeout=timeout)
    if parsed.scheme in ("", "file"):
        raw = read_corpus_bytes(parsed.path if parsed.scheme == "file" else uri, source=uri)
        return _digest(uri, raw, None)
    raise CorpusFetchError(f"{uri}: unsupported scheme {parsed.scheme!r} (use s3://, https://, file:// or a path)")


# --------------------------------------------------------------------------- S3


def s3_client(
    endpoint_url: str | None = None, unsigned: bool | None = None, attempts: int = 5, timeout: float = 30.0
) -> Any:
    """A boto3 S3 client: standard credential chain, unsigned when there are no credentials."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    session = boto3.session.Session()
    if unsigned is None:
        unsigned = session.get_credentials() is None
    config = Config(
        retries={"max_attempts": attempts, "mode": "standard"},  # transient errors only, exponential backoff
        connect_timeout=timeout,
        read_timeout=timeout,
        signature_version=UNSIGNED if unsigned else None,
    )
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def _fetch_s3(
    uri: str, bucket: str, key: str, *, endpoint_url: str | None, unsigned: bool | None, attempts: int, timeout: float
) -> FetchedCorpus:
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(endpoint_url, unsigned, attempts, timeout)
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        raw = response["Body"].read()
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        reason = {
            "NoSuchBucket": f"bucket {bucket!r} does not exist",
            "NoSuchKey": f"key {key!r} not found in bucket {bucket!r}",
            "404": f"key {key!r} not found in bucket {bucket!r}",
            "AccessDenied": "access denied (check the credentials, or the bucket policy for unsigned access)",
            "403": "access denied (check the credentials, or the bucket policy for unsigned access)",
        }.get(code, f"{code or status}: {err.response.get('Error', {}).get('Message', err)}")
        transient = isinstance(status, int) and (status >= 500 or status == 429)
        raise CorpusFetchError(f"{uri}: {reason}", transient=transient) from None
    except BotoCoreError as err:  # connection refused, timeouts… after the retries above
        raise CorpusFetchError(f"{uri}: {type(err).__name__}: {err}", transient=True) from None
    return _digest(uri, raw, response.get("ETag"))


# --------------------------------------------------------------------------- HTTP(S)


def _fetch_http(uri: str, *, attempts: int, backoff: float, timeout: float) -> FetchedCorpus:
    """GET with urllib3's own retries: connection errors and 408/429/5xx, exponential backoff."""
    import urllib3
    from urllib3.util import Retry

    retries = Retry(
        total=attempts - 1,
        backoff_factor=backoff,
        status_forcelist=(408, 429, 500, 502, 503, 504),
        allowed_methods=("GET",),
        raise_on_status=False,  # the last response comes back; its status is reported below
    )
    http = urllib3.PoolManager(retries=retries, timeout=urllib3.Timeout(total=timeout))
    try:
        response = http.request("GET", uri)
    except urllib3.exceptions.HTTPError as err:  # MaxRetryError once connection retries are spent
        reason = getattr(err, "reason", None) or err
        raise CorpusFetchError(f"{uri}: {reason} (after {attempts} attempts)", transient=True) from None
    if response.status != 200:
        transient = response.status >= 500 or response.status in (408, 429)
        raise CorpusFetchError(f"{uri}: HTTP {response.status} {response.reason}", transient=transient)
    return _digest(uri, response.data, response.headers.get("ETag"))
