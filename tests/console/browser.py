"""Debian's chromium driven by Playwright for Python, for the console's browser tests.

No browser is downloaded: Playwright starts the system's chromium (/usr/bin/chromium,
which .ci/run installs; SOFTRELAY_CHROMIUM names another). This machine and CI have no
outside network, so chromium's own calls home (background fetches, sync, component
updates, the first-run pages) are switched off: they could only fail, and they would be
requests leaving the console's origin that the console did not make.

`Watch` records what the pages of a browser context did (every request's URL, console
errors, uncaught exceptions); `read_events` reads a few events of the console's event
stream as any HTTP client would; `artifacts` is where screenshots and page HTML go.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Playwright, WebError

from tests.limits import in_ci
from tests.serverprocess import find_binary

CHROMIUM_ENV = "SOFTRELAY_CHROMIUM"
DEBIAN_CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS_ENV = "SOFTRELAY_ARTIFACTS"
REPO = Path(__file__).resolve().parents[2]
LAUNCH_ARGS = (
    "--disable-background-networking",
    "--disable-sync",
    "--disable-component-update",
    "--no-first-run",
    "--no-default-browser-check",
)


def chromium() -> Path:
    """The chromium to drive; a skip without one, a failure in CI (.ci/run installs it)."""
    path = find_binary(CHROMIUM_ENV, DEBIAN_CHROMIUM, "chromium")
    if path is None:
        where = os.environ.get(CHROMIUM_ENV) or DEBIAN_CHROMIUM
        if in_ci():
            pytest.fail(f"CI is set and there is no chromium at {where}: .ci/run installs it")
        pytest.skip(f"no chromium at {where} (Debian package chromium)")
    return path


async def launch(playwright: Playwright) -> Browser:
    """Headless chromium. Playwright starts it without chromium's sandbox (its default,
    chromium_sandbox=False), which is also what lets it run as root in a CI container."""
    return await playwright.chromium.launch(
        executable_path=str(chromium()), headless=True, args=list(LAUNCH_ARGS)
    )


def artifacts() -> Path:
    """Where the console's tests leave screenshots and pages: $SOFTRELAY_ARTIFACTS/console,
    else var/artifacts/console of the checkout."""
    base = os.environ.get(ARTIFACTS_ENV)
    folder = (Path(base) if base else REPO / "var" / "artifacts") / "console"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass
class Watch:
    """What the pages of one browser context did: the URL of every request they made,
    their console's errors, and the exceptions no script caught."""

    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    @classmethod
    def on(cls, context: BrowserContext) -> Watch:
        watch = cls()

        def console(message: ConsoleMessage) -> None:
            if message.type == "error":
                watch.console_errors.append(f"{message.text} at {message.location.get('url')}")

        def web_error(error: WebError) -> None:
            watch.page_errors.append(str(error.error))

        context.on("request", lambda request: watch.requests.append(request.url))
        context.on("console", console)
        context.on("weberror", web_error)
        return watch

    def foreign(self, own: str) -> list[str]:
        """The requests that went anywhere but the origin `own`."""
        return [url for url in self.requests if origin(url) != origin(own)]


async def read_events(url: str, cookie: str, count: int) -> str:
    """The first `count` events (blocks with data) of the event stream at `url`, sent
    the `Cookie` header `cookie`, as the text that came (the caller bounds the wait)."""
    text: list[str] = []
    block: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Accept": "text/event-stream", "Cookie": cookie}) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.content_type == "text/event-stream"
        while count > 0:
            line = (await response.content.readline()).decode()
            assert line, f"the event stream ended after:\n{''.join(text)}"
            text.append(line)
            if line.strip():
                block.append(line)
                continue
            # An empty line ends an event (a block of only comments is none).
            if any(item.startswith("data:") for item in block):
                count -= 1
            block.clear()
    return "".join(text)
