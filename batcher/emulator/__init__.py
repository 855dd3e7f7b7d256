"""``batcher.emulator``: a local emulator of the Gemini Developer API's batch subset (files, batches,
generateContent for image models), for offline tests. Stdlib HTTP server; the library never imports it.

See docs/EMULATOR.md.
"""

from .app import Emulator
from .faults import JOB_OUTCOMES, PROMPT_MARKERS, EmulatorConfig

__all__ = ["Emulator", "EmulatorConfig", "JOB_OUTCOMES", "PROMPT_MARKERS"]
