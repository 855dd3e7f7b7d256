"""Emulator configuration: everything the emulator can be told (timing, limits, faults, models, money, Vertex AI,
webhooks), and the values some fields may take."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..image_models import extra_model

STATE_STYLES = ("BATCH_STATE", "JOB_STATE")
THOUGHT_PARTS = ("requested", "always", "never")
JOB_OUTCOMES = ("SUCCEEDED", "FAILED", "EXPIRED", "CANCELLED", "STUCK")
LINE_ERROR_STYLES = ("grpc", "http")


@dataclass
class EmulatorConfig:
    """Everything the emulator can be told. All fields except host/port can be changed at run time
    (``Emulator.configure`` / ``POST /_emulator/config``)."""

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None  # None: any non-empty key is accepted
    # Timing (emulated seconds; emulated clock = start + real elapsed * time_scale + advances)
    time_scale: float = 1.0
    pending_seconds: float = 0.5
    running_seconds: float = 1.0
    expiry_seconds: float = 48 * 3600.0  # jobs pending/running longer than this expire
    file_ttl_seconds: float = 48 * 3600.0  # files expire this long after creation
    # Images
    image_bytes: int = 20_000
    seed: int = 0
    # Limits
    tier: str = "1"
    max_concurrent_jobs: int = 100
    enqueued_token_cap: int | None = None  # overrides the per-model, per-tier table
    max_file_bytes: int = 2 * 1024**3
    max_storage_bytes: int = 20 * 1024**3
    max_inline_request_bytes: int = 20 * 1000 * 1000
    list_default_page_size: int = 10
    # HTTP faults
    fail_rate: float = 0.0
    fail_status: int = 503
    fail_routes: list[str] | None = None  # restrict fail_rate / rate_limit_rate to these routes
    fail_nth: dict[str, list[int]] = field(default_factory=dict)  # {"POST batchGenerateContent": [1, 2]}
    rate_limit_rate: float = 0.0
    rate_limit_nth: dict[str, list[int]] = field(default_factory=dict)
    retry_delay: str = "30s"
    drop_download_after_bytes: int | None = None
    drop_download_times: int | None = None  # None: every download; N: the next N downloads
    # The create succeeds on the server, then the reply is an error (a timeout or 5xx after the commit):
    # the next N creates answer 503 although their job exists. A client that retries create makes duplicates.
    create_then_fail_times: int = 0
    # Per-line faults
    line_error_rate: float = 0.0
    line_error_style: str = "grpc"  # "grpc": code 13 INTERNAL; "http": code 500 INTERNAL
    safety_block_rate: float = 0.0
    prompt_block_rate: float = 0.0
    text_only_rate: float = 0.0
    # Result-file corruption (the job SUCCEEDED, its responses file is damaged)
    corrupt_base64_rate: float = 0.0  # image lines whose inlineData.data is not valid base64
    not_image_rate: float = 0.0  # image lines whose data is valid base64 of bytes that are not an image
    truncate_results_lines: int = 0  # drop the last N lines of a results file (their keys go missing)
    truncate_results_times: int | None = None  # None: every results file; N: only the next N
    # Job-level behaviour
    job_outcomes: list[str] = field(default_factory=list)  # consumed one per created job
    state_style: str = "BATCH_STATE"
    finalize_error_mime_types: list[str] = field(default_factory=list)
    omit_optional_fields: bool = False
    # Models (batcher/emulator/image_models.py): batcher/catalog.toml's table, changed as the real service may differ
    shutdown_models: list[str] | None = None  # answer 404 for these; None: those shut down by the emulated date
    extra_models: dict[str, dict] = field(default_factory=dict)  # {"name": {"like": "gemini-3.1-flash-image", ...}}
    # Thinking models: every response bills thoughtsTokenCount; interim images and text marked `thought: true` come
    # before the final image when the request asks for them (thinkingConfig.includeThoughts), or always, or never
    thought_parts: str = "requested"
    # Strictness where the real behaviour is not documented (docs/EMULATOR.md, "Decisions")
    strict_upload_length: bool = False  # refuse an upload start without X-Goog-Upload-Header-Content-Length
    strict_line_keys: bool = False  # a JSONL line without "key" (or without the "request" wrapper) is a line error
    # Money (usage tiers): spend is billed as lines and calls are answered, at batcher/catalog.toml's prices
    spend_limits: bool = True  # enforce the monthly spend caps and the spend-based rate limit
    monthly_spend_cap_usd: float | None = None  # the billing account's cap; None: the tier's
    project_spend_cap_usd: float | None = None  # a project spend cap set in AI Studio; None: none
    spend_rate_usd_per_10min: float | None = None  # None: the tier's
    spent_this_month_usd: float = 0.0  # what the billing account spent this month before the emulator started
    prepay_balance_usd: float | None = None  # prepaid credits; None: a postpaid account
    prepay_status: int = 402  # the answer once they are used up (429 before mid-2026)
    # Vertex AI batch prediction (batcher/emulator/vertex/)
    gcs_endpoint: str | None = None  # GCS (emulator) URL for job input/output; None: STORAGE_EMULATOR_HOST or real GCS
    vertex_token: str | None = None  # accept only this bearer token (None: any non-empty one)
    vertex_echo_key: bool = False  # output lines carry the input line's "key" (unverified on the real service)
    vertex_shuffle_output: bool = False  # output lines in a seeded shuffled order (Vertex does not promise order)
    vertex_partial_state: bool = True  # some lines failed: JOB_STATE_PARTIALLY_SUCCEEDED (False: SUCCEEDED)
    vertex_project_number: str | None = None  # resource names carry this instead of the project sent
    # Webhooks (batcher/emulator/gemini/webhooks.py): how events are signed and how often a failed delivery is retried
    webhook_secret: str = "whsec_ZW11bGF0b3Itd2ViaG9vay1zZWNyZXQ="  # base64 of "emulator-webhook-secret"
    webhook_max_attempts: int = 5
    webhook_retry_seconds: float = 0.2  # real seconds before the first retry; doubles each time

    def validate(self) -> None:
        if self.thought_parts not in THOUGHT_PARTS:
            raise ValueError(f"thought_parts must be one of {THOUGHT_PARTS}, not {self.thought_parts!r}")
        if self.prepay_status not in (402, 429):
            raise ValueError("prepay_status must be 402 or 429")
        if not isinstance(self.extra_models, dict):
            raise ValueError("extra_models must be an object: {name: {\"like\": model, ...}}")
        for name, fields in self.extra_models.items():
            extra_model(name, fields)
        if self.state_style not in STATE_STYLES:
            raise ValueError(f"state_style must be one of {STATE_STYLES}, not {self.state_style!r}")
        if self.line_error_style not in LINE_ERROR_STYLES:
            raise ValueError(f"line_error_style must be one of {LINE_ERROR_STYLES}")
        for o in self.job_outcomes:
            if o not in JOB_OUTCOMES:
                raise ValueError(f"job outcome must be one of {JOB_OUTCOMES}, not {o!r}")
        if str(self.tier) not in ("1", "2", "3"):
            raise ValueError("tier must be '1', '2' or '3'")
        self.tier = str(self.tier)
        if self.truncate_results_lines < 0:
            raise ValueError("truncate_results_lines must be >= 0")
        if self.time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        for name in ("fail_rate", "rate_limit_rate", "line_error_rate", "safety_block_rate",
                     "prompt_block_rate", "text_only_rate", "corrupt_base64_rate", "not_image_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CONFIG_FIELDS = {f.name for f in dataclasses.fields(EmulatorConfig)}
