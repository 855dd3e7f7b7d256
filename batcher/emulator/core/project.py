"""The emulated Google Cloud project: what both services share.

One configuration, one emulated clock, one fault RNG, one lock, one billing account, one set of counters (route
counts and fault counts included), and one stop signal for the workers. The services (Gemini API, Vertex AI) are
attached to it and never see each other: ``stats()`` merges what each one reports, ``reset()`` resets each one,
``configure()`` and ``advance()`` wake each one's worker.
"""

from __future__ import annotations

import copy
import threading
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from ..billing import Billing
from ..image_models import ImageModel, served
from .clock import Clock, rfc3339
from .config import CONFIG_FIELDS, EmulatorConfig
from .faults import FaultInjector

# Counters stats() shows from the start: the jobs, lines and calls both services count, and the core's own.
# A service adds its own (Service.COUNTERS); a counter counted without being declared appears when first counted.
COUNTERS = ("batches_created", "batches_cancelled", "batches_deleted", "batches_succeeded", "batches_failed",
            "batches_expired", "generate_content_calls", "lines_processed", "lines_failed", "images_generated",
            "faults_injected", "http_errors")


class Service(Protocol):
    """What the project asks of a service attached to it."""

    COUNTERS: tuple[str, ...]

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def reset(self) -> None: ...

    def wake(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class Project:
    """All state the services share. Thread-safe: ``lock`` (re-entrant) guards the counters and every service's
    dictionaries."""

    def __init__(self, config: EmulatorConfig, data_dir: str) -> None:
        self.config = config
        self.data_dir = data_dir
        self.lock = threading.RLock()
        self.clock = Clock(config.time_scale)
        self.injector = FaultInjector(config.seed)
        self.billing = Billing(lambda: self.config, self.clock.now)
        self.stopping = threading.Event()  # set once, on stop: every worker ends
        self.services: list[Service] = []
        self._reset_counters()

    def attach(self, service: Service) -> None:
        with self.lock:
            self.services.append(service)
            for key in service.COUNTERS:
                self.counters.setdefault(key, 0)

    # ----- lifecycle -------------------------------------------------------------------------------
    def run_worker(self, kick: threading.Event, tick: Callable[[], None]) -> None:
        """A service's worker thread: `tick` when kicked, or every 20 ms, until the project stops. An exception is
        printed and counted in stats (`worker_errors`), never the end of the worker."""
        while not self.stopping.is_set():
            kick.wait(0.02)
            kick.clear()
            try:
                tick()
            except Exception:
                import traceback
                traceback.print_exc()
                self.count("worker_errors")

    def start(self) -> None:
        for s in self.services:
            s.start()

    def stop(self) -> None:
        self.stopping.set()
        for s in self.services:
            s.stop()

    def _reset_counters(self) -> None:
        with self.lock:
            self.route_counts: dict[str, int] = {}
            self.counters: dict[str, int] = {k: 0 for k in COUNTERS}
            for s in self.services:
                self.counters.update({k: 0 for k in s.COUNTERS})
            self.fault_counts: dict[str, int] = {}

    def reset(self) -> None:
        with self.lock:
            for s in self.services:
                s.reset()
            self._reset_counters()
            self.billing.reset()
            self.injector.reseed(self.config.seed)

    def configure(self, **fields: Any) -> None:
        with self.lock:
            unknown = set(fields) - CONFIG_FIELDS
            if unknown:
                raise ValueError(f"unknown config fields: {sorted(unknown)}")
            fixed = {k for k in fields if k in ("host", "port") and fields[k] != getattr(self.config, k)}
            if fixed:
                raise ValueError(f"cannot change {sorted(fixed)} at run time")
            old = self.config.to_dict()
            for k, v in fields.items():
                setattr(self.config, k, copy.deepcopy(v))
            try:
                self.config.validate()
            except Exception:
                for k, v in old.items():
                    setattr(self.config, k, v)
                raise
            if "time_scale" in fields:
                self.clock.set_scale(float(self.config.time_scale))
            if "seed" in fields:
                self.injector.reseed(self.config.seed)
        self._wake()

    def advance(self, seconds: float) -> None:
        self.clock.advance(float(seconds))
        self._wake()

    def _wake(self) -> None:
        for s in self.services:
            s.wake()

    # ----- counters --------------------------------------------------------------------------------
    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + n

    def count_fault(self, kind: str) -> None:
        with self.lock:
            self.counters["faults_injected"] += 1
            self.fault_counts[kind] = self.fault_counts.get(kind, 0) + 1

    def count_route(self, key: str) -> int:
        """Count a request to route `key`; returns N: this is its Nth request since the last reset."""
        with self.lock:
            n = self.route_counts.get(key, 0) + 1
            self.route_counts[key] = n
            return n

    def stats(self) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = {**self.counters, "requests": dict(self.route_counts), "faults": dict(self.fault_counts)}
            for s in self.services:
                out.update(s.stats())
            out["emulated_time"] = rfc3339(self.clock.now())
            out.update(self.billing.stats())
            return out

    # ----- models ----------------------------------------------------------------------------------
    def models(self) -> dict[str, ImageModel]:
        """The models served on the emulated date (batcher/emulator/image_models.py)."""
        today = datetime.fromtimestamp(self.clock.now(), timezone.utc).date()
        cfg = self.config
        return served(cfg.shutdown_models, cfg.extra_models, today)
