"""The `[crashreports]` section: projects and their keys, limits, forwarding, own errors.

Parsed once at start; each project's scrubbing chain is compiled here, so a pattern
that cannot work stops the start with the file and the key named. Deployment patterns
(`scrub_patterns`) are RE2 syntax, like the built-in rules: linear time, no lookaround.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from crashreports.regex import compile_re2
from crashreports.scrubber import Chain, RequireOptIn, compile_chain
from tomlsections.reader import Section

OPT_IN_MODES = ("tag", "dsn")
ATTACHMENT_MODES = ("refuse", "drop")
SCRUB_MODES = ("process", "thread")
DEFAULT_BUDGET_MS = 50
_PROJECT_ID = re.compile(r"^[0-9]{1,18}$")
_KEY = re.compile(r"^[0-9A-Za-z]{16,64}$")


@dataclass(frozen=True, slots=True)
class Project:
    id: str
    key: str = field(repr=False)
    opt_in: str  # "tag": the event carries the opt-in tag; "dsn": the key is the opt-in
    chain: Chain = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Upstream:
    """A Sentry DSN, split into where to send and how to authenticate."""

    envelope_url: str
    public_key: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class CrashSettings:
    projects: tuple[Project, ...] = ()
    max_body: int = 1024 * 1024  # bytes of an envelope, after decoding
    rate_limit: int = 600  # events per minute per project
    # Requests past the key check at once (body read, scrubbing, commit): past it 429.
    max_in_flight: int = 64
    attachments: str = "refuse"
    opt_in_tag: str = "softrelay.opt_in"
    opt_in_value: str = "yes"
    forward: Upstream | None = None
    forward_queue: int = 1000
    forward_attempts: int = 3
    self_dsn: str = field(default="", repr=False)
    self_environment: str = "production"
    self_chain: Chain = field(
        default_factory=lambda: compile_chain(opt_in=None), repr=False, compare=False
    )
    # Where chains run (`crashreports.workers`): processes, or threads; how many.
    scrub_mode: str = "process"
    scrub_workers: int = 1

    def project(self, project_id: str) -> Project | None:
        return next((p for p in self.projects if p.id == project_id), None)


def parse_dsn(dsn: str) -> Upstream:
    """`https://<key>@host[:port]/<project>` -> the envelope URL and the key."""
    parts = urlsplit(dsn)
    project = parts.path.rstrip("/").rsplit("/", 1)[-1]
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.username:
        raise ValueError("expected a DSN like https://<key>@host/<project>")
    if not _PROJECT_ID.match(project):
        raise ValueError("the DSN's path must end in a numeric project id")
    prefix = parts.path.rstrip("/").rsplit("/", 1)[0]
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    url = f"{parts.scheme}://{netloc}{prefix}/api/{project}/envelope/"
    return Upstream(url, parts.username)


def parse_crashreports(sec: Section) -> CrashSettings:
    extra_keys = tuple(sec.text_list("scrub_keys", []))
    for word in extra_keys:
        if not word.strip():
            raise sec.error("scrub_keys", "an empty word would match every key")
    extra_patterns: list[str] = []
    for text in sec.text_list("scrub_patterns", []):
        try:
            pattern = compile_re2(text)
        except ValueError as exc:
            raise sec.error(
                "scrub_patterns", f"{text!r} is not an RE2 regular expression: {exc}"
            ) from None
        if pattern.groups or pattern.match(""):
            raise sec.error(
                "scrub_patterns",
                f"{text!r}: use (?:...) instead of groups, and match at least one character",
            )
        extra_patterns.append(text)
    budget_ms = sec.integer("scrub_budget_ms", DEFAULT_BUDGET_MS, minimum=1)
    opt_in_tag = sec.text("opt_in_tag", "softrelay.opt_in")
    opt_in_value = sec.text("opt_in_value", "yes")
    if not opt_in_tag or not opt_in_value:
        raise sec.error("opt_in_tag", "the opt-in tag and its value may not be empty")

    def chain(opt_in: RequireOptIn | None) -> Chain:
        return compile_chain(
            opt_in=opt_in,
            extra_keys=extra_keys,
            extra_patterns=tuple(extra_patterns),
            budget=budget_ms / 1000,
        )

    by_tag = chain(RequireOptIn(opt_in_tag, opt_in_value))
    by_dsn = chain(None)
    projects: list[Project] = []
    for proj in sec.sections("project"):
        project_id = proj.text("id")
        if not _PROJECT_ID.match(project_id):
            raise proj.error("id", f"must be digits (the DSN's project id), got {project_id!r}")
        key = proj.text("key")
        if key.startswith(("env:", "file:")):
            # A key made per install (`make run` writes the demo project's), read now:
            # the section is parsed when a command first uses it (softrelay/config.py).
            key = proj.secret("key")
        if not _KEY.match(key):
            raise proj.error("key", "must be 16 to 64 letters or digits (the DSN's public key)")
        mode = proj.choice("opt_in", OPT_IN_MODES, "tag")
        proj.finish()
        if any(p.id == project_id for p in projects):
            raise sec.error("project", f"project {project_id!r} is configured twice")
        projects.append(Project(project_id, key, mode, by_tag if mode == "tag" else by_dsn))

    forward: Upstream | None = None
    fwd = sec.section("forward", {})
    forward_dsn = fwd.text("dsn", "")
    if forward_dsn:
        try:
            forward = parse_dsn(forward_dsn)
        except ValueError as exc:
            raise fwd.error("dsn", str(exc)) from None
    forward_queue = fwd.integer("queue", 1000, minimum=1)
    forward_attempts = fwd.integer("attempts", 3, minimum=1)
    fwd.finish()

    own = sec.section("self_report", {})
    self_dsn = own.text("dsn", "")
    if self_dsn:
        try:
            parse_dsn(self_dsn)
        except ValueError as exc:
            raise own.error("dsn", str(exc)) from None
    self_environment = own.text("environment", "production")
    own.finish()

    settings = CrashSettings(
        projects=tuple(projects),
        max_body=sec.integer("max_body", 1024 * 1024, minimum=1024),
        rate_limit=sec.integer("rate_limit", 600, minimum=1),
        max_in_flight=sec.integer("max_in_flight", 64, minimum=1),
        attachments=sec.choice("attachments", ATTACHMENT_MODES, "refuse"),
        opt_in_tag=opt_in_tag,
        opt_in_value=opt_in_value,
        forward=forward,
        forward_queue=forward_queue,
        forward_attempts=forward_attempts,
        self_dsn=self_dsn,
        self_environment=self_environment,
        self_chain=by_dsn,
        scrub_mode=sec.choice("scrub_mode", SCRUB_MODES, "process"),
        scrub_workers=sec.integer("scrub_workers", 1, minimum=1),
    )
    sec.finish()
    return settings
