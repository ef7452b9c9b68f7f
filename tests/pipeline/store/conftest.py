"""Fixtures of the store's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["local", "s3"])
def output_root(request, tmp_path) -> tuple[str, dict]:
    """(root, OutputStore options) of an empty output, on local disk and on moto S3."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    endpoint, bucket = request.getfixturevalue("moto_s3_endpoint"), request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out", {"s3_endpoint_url": endpoint}
