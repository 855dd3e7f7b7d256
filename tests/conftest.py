"""Hermetic tests: no real keys, no user cache, no network. The real SDK talks to the real emulator over HTTP."""

from __future__ import annotations

import pytest

from batcher.backends.gemini import Connection, GeminiBackend
from batcher.backends.retry import RetryPolicy

pytest_plugins = ["tests.emulator_support", "tests.gcs_support"]  # fixtures: the emulator tests' emu, c; a GCS bucket


@pytest.fixture(autouse=True)
def hermetic_env(tmp_path, monkeypatch):
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL", "GOOGLE_GENAI_API_VERSION", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BATCHER_CACHE_DIR", str(tmp_path / "user-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def emulator_session():
    from batcher.emulator import Emulator, EmulatorConfig

    with Emulator(EmulatorConfig(pending_seconds=0.05, running_seconds=0.1, image_bytes=3_000)) as emu:
        yield emu


@pytest.fixture
def emulator(emulator_session):
    """A clean emulator for each test (state and faults reset, fast timings)."""
    from batcher.emulator import EmulatorConfig

    defaults = EmulatorConfig(pending_seconds=0.05, running_seconds=0.1, image_bytes=3_000).to_dict()
    for fixed in ("host", "port"):
        defaults.pop(fixed, None)
    emulator_session.configure(**defaults)  # faults and limits from an earlier test must not leak
    emulator_session.reset()
    return emulator_session


def fast_retry() -> RetryPolicy:
    return RetryPolicy(attempts=8, initial_delay=0.01, max_delay=0.05)


@pytest.fixture
def backend_factory(emulator):
    return lambda: GeminiBackend(Connection(api_key="test-key", base_url=emulator.url, timeout_s=30), retry=fast_retry())


@pytest.fixture
def emulator_env(emulator, monkeypatch):
    """The SDK's own environment pointing at the emulator, as a user would set it."""
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", emulator.url)
    return emulator
