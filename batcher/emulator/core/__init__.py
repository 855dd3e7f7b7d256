"""The emulator's shared core, the same for every service: the HTTP server and request handler (``server``), URL
tables and route matching (``routing``), the error envelope (``errors``), emulated time (``clock``), the
configuration (``config``), fault injection (``faults``), the control API (``control``), and the project both
services share (``project``: config, clock, fault RNG, lock, counters, billing).

The core knows no service: a service is a URL table and a responses object mounted on the server, and a models
object (moto's "backend") attached to the project. Google's behaviour both services answer with (the served models, generation, images,
billing, the JSON front end) lives one level up, in ``batcher.emulator``.
"""
