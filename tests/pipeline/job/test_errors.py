import pytest

from pipeline.job.errors import failure, record_failure, redact


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
