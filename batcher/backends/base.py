"""What a backend is: the one interface the pipeline drives (the Gemini API, Vertex AI, and the in-process emulator
through the Gemini one), and the shapes it answers in. A backend maps every SDK, HTTP and storage error into
batcher.errors (backends.errors) and retries what is transient (backends.retry)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol


@dataclass(frozen=True)
class FileInfo:
    """A file the backend holds for us (an uploaded input, a staged reference image)."""

    name: str
    display_name: str | None
    size_bytes: int = 0


@dataclass(frozen=True)
class UploadedFile:
    name: str
    uri: str
    size_bytes: int
    expires_at: float | None  # epoch seconds


@dataclass(frozen=True)
class BatchInfo:
    name: str
    display_name: str | None
    state: str  # without prefix: PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED, ...
    created_at: str | None = None
    updated_at: str | None = None
    ended_at: str | None = None
    stats: dict = field(default_factory=dict)  # requestCount, successfulRequestCount, ... as ints
    output_file: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the API says of a model (models.get / models.list)."""

    name: str  # without "models/"
    display_name: str | None = None
    methods: tuple[str, ...] = ()  # supportedGenerationMethods (the SDK's supported_actions)
    thinking: bool | None = None
    input_token_limit: int | None = None
    output_token_limit: int | None = None

    @property
    def batch_capable(self) -> bool:
        return "batchGenerateContent" in self.methods


def normalize_state(state: str | None) -> str:
    """BATCH_STATE_X and JOB_STATE_X (both seen in the wild) -> X."""
    if not state:
        return "UNSPECIFIED"
    state = str(state).rsplit(".", 1)[-1]
    for prefix in ("BATCH_STATE_", "JOB_STATE_"):
        if state.startswith(prefix):
            return state[len(prefix) :]
    return state


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    value = re.sub(r"(\.\d{6})\d+", r"\1", value.replace("Z", "+00:00"))
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


class Backend(Protocol):
    """The calls the pipeline makes. Create is never retried (it is not idempotent: the caller reconciles by display
    name); everything else retries what is transient."""

    takes_webhooks: bool  # jobs can carry a webhook_config (Gemini API only)
    streams_results: bool  # results can be parsed while they download (one file, resumable by byte range)

    def server_now(self) -> float: ...
    def warm_up(self) -> None: ...  # make what the end of a collect needs (an SDK client) while it has time
    def upload_jsonl(self, path: Path, display_name: str) -> UploadedFile: ...
    def upload_image(self, path: Path, mime_type: str, display_name: str) -> UploadedFile: ...
    def delete_file(self, name: str) -> None: ...
    def list_files(self) -> Iterator[FileInfo]: ...
    def get_model(self, name: str) -> ModelInfo | None: ...  # None: this backend cannot say
    def list_models(self) -> Iterator[ModelInfo]: ...
    def create_batch(self, model: str, file_name: str, display_name: str, webhook: dict | None = None) -> BatchInfo: ...
    def get_batch(self, name: str) -> BatchInfo: ...
    def list_batches(self) -> Iterator[BatchInfo]: ...
    def cancel_batch(self, name: str) -> None: ...
    def download(self, file_name: str, dest: Path, on_bytes: Callable[[int], None] | None = None) -> int: ...
    def download_chunks(self, file_name: str, dest: Path, on_bytes: Callable[[int], None] | None = None,
                        block: int = 1 << 20) -> Iterator[bytes]: ...  # only where streams_results
    def generate_content(self, model: str, body: dict) -> dict: ...
