"""The stock schemathesis CLI against an app's /openapi.json, as the API fuzz tests run
it: every documented operation, examples then coverage then fuzzing, at most 15
generated cases per operation, deterministic by its seed; no 5xx, no status, Content-Type
or body the document does not describe."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

from tests.limits import LONGEST_WAIT


async def run_schemathesis(
    openapi_url: str, config_text: str, workdir: Path, headers: dict[str, str]
) -> tuple[int, str]:
    """Its exit status and output; `config_text` is its TOML configuration (operations
    excluded or given fixed parameters), `headers` go with every request."""
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is a test dependency (pyproject.toml)"
    config = workdir / "schemathesis.toml"
    config.write_text(config_text, encoding="utf-8")
    header_args = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    proc = await asyncio.create_subprocess_exec(
        st,
        "--config-file",
        str(config),
        "run",
        openapi_url,
        "--checks",
        "not_a_server_error,response_schema_conformance,status_code_conformance,"
        "content_type_conformance",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "15",
        "--seed",
        "1",
        "--request-timeout",
        "10",
        *header_args,
        "--continue-on-failure",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=workdir,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), LONGEST_WAIT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, output.decode(errors="replace")
