"""The ``Emulator`` object: wires the shared core (the project and the HTTP server) to both services (the Gemini
API and Vertex AI), and runs them."""

from __future__ import annotations

import copy
import shutil
import tempfile
import threading
from typing import Any

from .core.config import EmulatorConfig
from .core.project import Project
from .core.routing import Mount
from .core.server import EmulatorHTTPServer
from .gemini import urls as gemini_urls
from .gemini.models import GeminiService
from .gemini.responses import GeminiResponses
from .vertex import urls as vertex_urls
from .vertex.models import VertexService
from .vertex.responses import VertexResponses


class Emulator:
    """A local emulator of the Gemini Developer API's batch subset.

    ``with Emulator(EmulatorConfig(port=0)) as emu: ...`` starts the server and the batch worker;
    ``emu.url`` is the base URL to give the SDK (``HttpOptions(base_url=emu.url, api_version="v1beta")``).
    """

    def __init__(self, config: EmulatorConfig | None = None, data_dir: str | None = None, **fields: Any) -> None:
        self.config = copy.deepcopy(config) if config is not None else EmulatorConfig()
        for k, v in fields.items():
            setattr(self.config, k, v)
        self.config.validate()
        self._own_dir = data_dir is None
        self.data_dir = data_dir
        self._httpd: EmulatorHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.project: Project | None = None
        self.service: GeminiService | None = None  # the Gemini API
        self.vertex: VertexService | None = None
        self.url = ""

    # lifecycle
    def start(self) -> "Emulator":
        if self._httpd is not None:
            return self
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="batcher-emulator-")
        self.project = Project(self.config, self.data_dir)
        self.service = GeminiService(self.project)
        self.vertex = VertexService(self.project)
        for service in (self.service, self.vertex):
            self.project.attach(service)
        mounts = [Mount(gemini_urls.URLS, GeminiResponses(self.service)),
                  Mount(vertex_urls.URLS, VertexResponses(self.vertex))]
        self._httpd = EmulatorHTTPServer((self.config.host, int(self.config.port)), self.project, mounts)
        host, port = self._httpd.server_address[:2]
        shown = self.config.host if self.config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in shown:
            shown = f"[{shown}]"
        self.url = f"http://{shown}:{port}"
        self.service.base_url = self.url
        self.project.start()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="emulator-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=10)
        assert self.project is not None
        self.project.stop()
        self._httpd = None
        if self._own_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # control (same as the /_emulator/ HTTP API)
    def _project(self) -> Project:
        if self.project is None:
            raise RuntimeError("the emulator is not running: call start() first")
        return self.project

    def stats(self) -> dict[str, Any]:
        return self._project().stats()

    def configure(self, **fields: Any) -> None:
        self._project().configure(**fields)

    def reset(self) -> None:
        self._project().reset()

    def advance(self, seconds: float) -> None:
        self._project().advance(seconds)

    def now(self) -> float:
        """The emulated clock, as a Unix timestamp."""
        return self._project().clock.now()
