from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading

import boto3
import pytest

from charlm.data import CorpusError
from charlm.storage import CorpusFetchError, fetch_corpus
from tests.s3server import CREDENTIALS, moto_server


@pytest.fixture(scope="module")
def s3():
    with moto_server() as endpoint:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket="corpora")
        client.put_object(
            Bucket="corpora", Key="good.txt", Body="Supposing that Truth is a woman—what then?\n".encode()
        )
        client.put_object(Bucket="corpora", Key="latin1.txt", Body="café".encode("latin-1"))
        client.put_object(Bucket="corpora", Key="empty.txt", Body=b"")
        client.create_bucket(Bucket="public")
        client.put_object(Bucket="public", Key="open.txt", Body=b"free spirits\n")
        client.put_bucket_policy(
            Bucket="public",
            Policy=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": "*",
                            "Action": "s3:GetObject",
                            "Resource": "arn:aws:s3:::public/*",
                        }
                    ],
                }
            ),
        )
        yield endpoint


@pytest.fixture
def aws_env(monkeypatch):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)


def test_fetch_from_s3_records_size_etag_and_sha256(s3, aws_env):
    fetched = fetch_corpus("s3://corpora/good.txt", endpoint_url=s3)
    raw = "Supposing that Truth is a woman—what then?\n".encode()
    assert fetched.text == raw.decode()
    assert fetched.size == len(raw)
    assert fetched.sha256 == hashlib.sha256(raw).hexdigest()
    assert fetched.etag == hashlib.md5(raw).hexdigest()  # S3's ETag of a single-part upload


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://corpora/missing.txt", "s3://corpora/missing.txt: key 'missing.txt' not found in bucket 'corpora'"),
        ("s3://no-such-bucket/a.txt", "s3://no-such-bucket/a.txt: bucket 'no-such-bucket' does not exist"),
        ("s3://corpora/latin1.txt", "s3://corpora/latin1.txt: not UTF-8 text"),
        ("s3://corpora/empty.txt", "s3://corpora/empty.txt: the corpus is empty"),
        ("s3://corpora", "s3://corpora: expected s3://bucket/key"),
    ],
)
def test_s3_errors_name_the_uri(s3, aws_env, uri, message):
    with pytest.raises(CorpusError, match=re.escape(message)):
        fetch_corpus(uri, endpoint_url=s3)


def test_unsigned_access_needs_a_public_bucket(s3, monkeypatch):
    for key in CREDENTIALS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    assert fetch_corpus("s3://public/open.txt", endpoint_url=s3).text == "free spirits\n"  # no credentials: unsigned
    with pytest.raises(CorpusFetchError, match="s3://corpora/good.txt: access denied"):
        fetch_corpus("s3://corpora/good.txt", endpoint_url=s3, unsigned=True)


def test_unreachable_endpoint_fails_with_the_uri(aws_env):
    with pytest.raises(CorpusFetchError, match="s3://corpora/good.txt: EndpointConnectionError"):
        fetch_corpus("s3://corpora/good.txt", endpoint_url="http://127.0.0.1:9", attempts=2, timeout=2)


class _Flaky(http.server.BaseHTTPRequestHandler):
    failures_left = 2

    def do_GET(self):
        if self.path == "/flaky.txt" and _Flaky.failures_left:
            _Flaky.failures_left -= 1
            self.send_error(503)
            return
        if self.path in ("/flaky.txt", "/ok.txt"):
            body = b"thus spoke\n"
            self.send_response(200)
            self.send_header("ETag", '"abc123"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_https_and_local_paths(http_server, tmp_path):
    fetched = fetch_corpus(f"{http_server}/ok.txt")
    assert (fetched.text, fetched.etag) == ("thus spoke\n", "abc123")
    _Flaky.failures_left = 2
    assert fetch_corpus(f"{http_server}/flaky.txt", backoff=0.01).text == "thus spoke\n"  # 503 twice, retried
    with pytest.raises(CorpusFetchError, match=r"/missing.txt: HTTP 404"):
        fetch_corpus(f"{http_server}/missing.txt", backoff=0.01)
    path = tmp_path / "local.txt"
    path.write_text("beyond good and evil\n")
    assert fetch_corpus(str(path)).sha256 == fetch_corpus(f"file://{path}").sha256
    with pytest.raises(CorpusFetchError, match="ftp://x/y: unsupported scheme"):
        fetch_corpus("ftp://x/y")
