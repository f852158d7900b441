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
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

from charlm.data import CorpusError, decode_corpus, read_corpus_bytes

DEFAULT_CORPUS_URI = "s3://text-datasets/nietzsche.txt"


class CorpusFetchError(CorpusError):
    """The corpus could not be fetched; the message names the URI and the reason."""


@dataclass(frozen=True)
class FetchedCorpus:
    uri: str
    text: str
    size: int  # bytes
    sha256: str
    etag: str | None

    def describe(self) -> dict[str, str | int | None]:
        out = asdict(self)
        del out["text"]
        return out


def _digest(uri: str, raw: bytes, etag: str | None) -> FetchedCorpus:
    text = decode_corpus(raw, uri)
    return FetchedCorpus(
        uri=uri,
        text=text,
        size=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
        etag=etag.strip('"') if etag else None,
    )


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
    if parsed.scheme == "s3":
        if not parsed.netloc or not parsed.path.lstrip("/"):
            raise CorpusFetchError(f"{uri}: expected s3://bucket/key")
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


def s3_client(endpoint_url: str | None = None, unsigned: bool | None = None, attempts: int = 5, timeout: float = 30.0):
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
        raise CorpusFetchError(f"{uri}: {reason}") from None
    except BotoCoreError as err:  # connection refused, timeouts… after the retries above
        raise CorpusFetchError(f"{uri}: {type(err).__name__}: {err}") from None
    return _digest(uri, raw, response.get("ETag"))


# --------------------------------------------------------------------------- HTTP(S)


def _fetch_http(uri: str, *, attempts: int, backoff: float, timeout: float) -> FetchedCorpus:
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(uri, timeout=timeout) as response:
                return _digest(uri, response.read(), response.headers.get("ETag"))
        except urllib.error.HTTPError as err:
            transient = err.code in (408, 429) or err.code >= 500
            if not transient or attempt == attempts:
                raise CorpusFetchError(f"{uri}: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            if attempt == attempts:
                raise CorpusFetchError(f"{uri}: {getattr(err, 'reason', err)} (after {attempts} attempts)") from None
        time.sleep(backoff * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
