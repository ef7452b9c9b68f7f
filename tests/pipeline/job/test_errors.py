import pytest

from pipeline.job.errors import failure, record_failure, redact, storage_fault, store_unavailable


def test_failure_records_stage_type_and_message():
    assert failure("decode", ValueError("bad header")) == {
        "error_stage": "decode", "error_type": "ValueError", "error_message": "bad header"}
    assert failure("encode", RuntimeError())["error_message"] == "RuntimeError()"
    with pytest.raises(ValueError):
        failure("somewhere", ValueError("x"))


def test_secrets_are_redacted(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    text = ("could not read: key s3cr3t-value-123; aws_secret_access_key=abcd1234 "
            "https://b.s3/x?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA/123 password: hunter22")
    cleaned = redact(text)
    for secret in ("s3cr3t-value-123", "abcd1234", "deadbeef", "AKIA/123", "hunter22"):
        assert secret not in cleaned
    assert "could not read" in cleaned


def test_record_failure_logs_and_keeps_row(caplog, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecretvalue")
    row = {"video_id": "v1", "uri": "s3://b/v1.mp4", "caption": "a cat"}
    marked = record_failure(row, "read", FileNotFoundError("no such key topsecretvalue"))
    assert marked["caption"] == "a cat" and marked["error_stage"] == "read"
    assert "topsecretvalue" not in marked["error_message"]
    assert "v1" in caplog.text and "topsecretvalue" not in caplog.text


def test_unreadable_input_is_a_read_failure_whatever_the_stage():
    assert failure("decode", FileNotFoundError("gone"))["error_stage"] == "read"
    assert failure("decode", PermissionError("denied"))["error_stage"] == "read"


def test_one_line_joins_a_multi_line_message_and_redacts_it():
    from pipeline.job.errors import one_line

    error = RuntimeError("decord failed:\n  Check failed: size\n\nStack trace: token=abc123")
    assert one_line(error) == "decord failed: Check failed: size Stack trace: token=***"
    assert one_line(ValueError()) == "ValueError"


# ---- the object store's faults, as the real clients report them once their retries are spent ------------------

def _s3_clients(endpoint: str):
    """(boto3 client, pyarrow filesystem, Lance storage options) that try once and wait 1 s for an answer."""
    import boto3
    import pyarrow.fs as pafs

    from pipeline.store.s3 import S3Retries

    once = S3Retries(attempts=1, read_timeout_s=1, request_timeout_s=1)
    host = endpoint.removeprefix("http://")
    filesystem = pafs.S3FileSystem(**once.pyarrow_options(), endpoint_override=host, scheme="http")
    lance_options = {**once.lance_options(), "aws_endpoint": endpoint, "allow_http": "true"}
    return boto3.client("s3", endpoint_url=endpoint, config=once.boto3_config()), filesystem, lance_options


def _client_errors(endpoint: str, bucket: str) -> dict[str, Exception]:
    import lance
    import pyarrow as pa

    client, filesystem, lance_options = _s3_clients(endpoint)
    calls = {
        "boto3": lambda: client.get_object(Bucket=bucket, Key="a.mp4"),
        "pyarrow": lambda: filesystem.get_file_info(f"{bucket}/a.parquet"),
        "lance": lambda: lance.write_dataset(pa.table({"a": [1]}), f"s3://{bucket}/t.lance",
                                             storage_options=lance_options),
    }
    errors = {}
    for name, call in calls.items():
        with pytest.raises(Exception) as raised:
            call()
        errors[name] = raised.value
    return errors


@pytest.mark.parametrize("fault", ["slowdown", "error", "reset_before", "stall"])
def test_each_clients_report_of_a_store_fault_is_told_apart(fault, moto_s3_endpoint, s3_bucket):
    from pipeline.testing.s3_faults import FaultPlan, FaultyS3Proxy

    with FaultyS3Proxy(moto_s3_endpoint, FaultPlan(**{fault: 1.0}, stall_s=3)) as proxy:
        errors = _client_errors(proxy.endpoint, s3_bucket)
    for client, error in errors.items():
        assert store_unavailable(error), f"{client}: {type(error).__name__}: {error}"
        assert storage_fault(error).startswith("the object store does not answer")


def test_other_failures_are_not_store_faults(moto_s3_endpoint, s3_bucket, s3_client):
    import boto3
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as missing:
        boto3.client("s3", endpoint_url=moto_s3_endpoint).get_object(Bucket=s3_bucket, Key="none.mp4")
    for error in (missing.value, FileNotFoundError("no such S3 object: s3://b/a.mp4"), ValueError("bad header"),
                  RuntimeError("DecodeError: Invalid data found when processing input")):
        assert store_unavailable(error) is None and storage_fault(error) is None, error
