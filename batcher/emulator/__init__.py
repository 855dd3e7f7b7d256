"""``batcher.emulator``: a local emulator of the Gemini Developer API's batch subset (files, batches,
generateContent for image models), for offline tests. Stdlib HTTP server; the library never imports it.

See docs/EMULATOR.md.
"""

from .app import Emulator
from .core.config import JOB_OUTCOMES, EmulatorConfig
from .core.faults import PROMPT_MARKERS

__all__ = ["Emulator", "EmulatorConfig", "JOB_OUTCOMES", "PROMPT_MARKERS"]
