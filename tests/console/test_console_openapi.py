"""The admin listener's own /openapi.json: every console route described, and the stock
schemathesis run over it with a logged-in session finds no server error and no answer
outside the document (as tests/test_dsr_api.py runs it over the public port's)."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from tests.console.conftest import ConsoleWorld
from tests.console.test_api import crash_report
from tests.schemathesis import run_schemathesis

ROUTES = {
    "/login": {"get", "post"},
    "/logout": {"post"},
    "/api/v1/overview": {"get"},
    "/api/v1/usage": {"get"},
    "/api/v1/crashes": {"get"},
    "/api/v1/crashes/{id}": {"get"},
    "/api/v1/privacy": {"get"},
    "/api/v1/cluster": {"get"},
    "/api/v1/events": {"get"},
    "/api/v1/actions/audit": {"post"},
    "/api/v1/actions/sweep": {"post"},
    "/openapi.json": {"get"},
}
# POST /logout would end the fuzzer's own session, and the event stream never ends
# while it lasts: both are tested on their own (test_sessions.py, test_api.py).
SCHEMATHESIS_CONFIG = """
[[operations]]
include-path-regex = "crashes/[{{]id[}}]$"
parameters = {{ "path.id" = "{crash_id}" }}

[[operations]]
include-path = "/logout"
enabled = false

[[operations]]
include-path = "/api/v1/events"
enabled = false
"""


async def test_the_console_document_describes_every_console_route(console: ConsoleWorld) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{console.base}/openapi.json") as answer,
    ):
        assert answer.status == 200
        document = await answer.json()
    assert document["info"]["title"] == "softrelay console"
    for path, methods in ROUTES.items():
        assert methods <= set(document["paths"][path]), path
    # The public port's routes are not the console's, and the console's not theirs.
    assert "/usage/v1/ping" not in document["paths"]
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{console.http_base}/openapi.json") as public,
    ):
        assert not any(p.startswith("/api/v1/") for p in (await public.json())["paths"])


async def _schemathesis(
    base: str, cookie: str, csrf: str, crash_id: str, workdir: Path
) -> tuple[int, str]:
    return await run_schemathesis(
        f"{base}/openapi.json",
        SCHEMATHESIS_CONFIG.format(crash_id=crash_id),
        workdir,
        {"Cookie": f"softrelay_console={cookie}", "X-CSRF-Token": csrf},
    )


async def test_schemathesis_with_a_session_finds_no_server_error_and_no_schema_violation(
    console: ConsoleWorld, tmp_path: Path
) -> None:
    """Every operation but logout and the stream, fuzzed with a logged-in session and
    its CSRF token, over a relay with a registered phone and a crash report."""
    await console.phone()
    async with aiohttp.ClientSession() as http:
        crash_id = await crash_report(console, http, "alice")
    async with console.logged_in() as admin:
        returncode, output = await _schemathesis(
            admin.base, admin.session_id, admin.csrf, crash_id, tmp_path
        )
        # The session outlived the run: the fuzzer's requests did not end it.
        assert (await admin.json("/api/v1/overview"))["registered_phones"] == 1
    assert returncode == 0, output[-6000:]
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", output)
    assert selected is not None, output[-2000:]
    chosen, total, tested = (int(n) for n in selected.groups())
    assert chosen == tested == total - 2  # all but logout and the stream, every one run
