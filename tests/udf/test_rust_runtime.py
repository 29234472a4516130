"""The Rust crate's runtime (``sdks/rust``, std only) passes the runtime conformance suite: the
``conformance`` example is built with ``cargo build --offline --release`` (cached under
``.trace/udf-sdks`` by source digest) and started as the Lite runner starts a Rust bundle's
``bootstrap``, with the runner's minimal environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from udf_lang_conformance import RuntimeConformance
from udf_lang_fakes import CARGO, build_rust

pytestmark = pytest.mark.skipif(
    not os.access(CARGO, os.X_OK), reason=f"cargo is not installed ({CARGO}): Rust SDK not built"
)


@pytest.fixture(scope="module")
def conformance_exe() -> Path:
    return build_rust("conformance")


class TestRustRuntime(RuntimeConformance):
    error_type = "HandlerError"
    crash_type = "Panic"

    @pytest.fixture
    def start_cmd(self, conformance_exe: Path) -> list[str]:
        return [str(conformance_exe)]
