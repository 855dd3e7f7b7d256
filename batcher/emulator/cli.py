"""``batcher emulator``: run the local Gemini batch emulator until SIGINT/SIGTERM."""

from __future__ import annotations

import errno
import json
import signal
import sys
import threading

import click

from .core.config import JOB_OUTCOMES, STATE_STYLES, EmulatorConfig


@click.command(name="emulator")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=0, type=int, show_default=True, help="Port; 0 picks a free one.")
@click.option("--api-key", default=None, help="Accept only this x-goog-api-key (default: any non-empty key).")
@click.option("--time-scale", default=1.0, type=float, show_default=True,
              help="Emulated seconds per real second.")
@click.option("--pending-seconds", default=0.5, type=float, show_default=True,
              help="Emulated seconds a job stays PENDING.")
@click.option("--running-seconds", default=1.0, type=float, show_default=True,
              help="Emulated seconds a job stays RUNNING.")
@click.option("--image-bytes", default=20_000, type=int, show_default=True, help="Approximate bytes per PNG.")
@click.option("--seed", default=0, type=int, show_default=True, help="Seed for fault injection.")
@click.option("--tier", default="1", type=click.Choice(["1", "2", "3"]), show_default=True,
              help="Billing tier for the enqueued-token caps.")
@click.option("--max-concurrent-jobs", default=100, type=int, show_default=True)
@click.option("--enqueued-token-cap", default=None, type=int, help="Override the per-model enqueued-token cap.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Where files live (default: a temp dir removed on exit).")
@click.option("--fail-rate", default=0.0, type=float, help="Fraction of JSON calls answered with --fail-status.")
@click.option("--fail-status", default=503, type=int, show_default=True)
@click.option("--rate-limit-rate", default=0.0, type=float, help="Fraction of JSON calls answered 429.")
@click.option("--line-error-rate", default=0.0, type=float, help="Fraction of lines answered with an error.")
@click.option("--line-error-style", default="grpc", type=click.Choice(["grpc", "http"]), show_default=True)
@click.option("--safety-block-rate", default=0.0, type=float, help="Fraction of lines with IMAGE_SAFETY.")
@click.option("--prompt-block-rate", default=0.0, type=float, help="Fraction of lines with a blocked prompt.")
@click.option("--text-only-rate", default=0.0, type=float, help="Fraction of lines answered with text only.")
@click.option("--drop-download-after-bytes", default=None, type=int,
              help="Cut download connections after this many bytes.")
@click.option("--drop-download-times", default=None, type=int, help="Only the next N downloads are cut.")
@click.option("--corrupt-base64-rate", default=0.0, type=float,
              help="Fraction of image lines whose base64 data is corrupted.")
@click.option("--not-image-rate", default=0.0, type=float,
              help="Fraction of image lines whose data is valid base64 but not an image.")
@click.option("--truncate-results-lines", default=0, type=int,
              help="Drop the last N lines of results files (their keys go missing).")
@click.option("--truncate-results-times", default=None, type=int, help="Only the next N results files are truncated.")
@click.option("--state-style", default="BATCH_STATE", type=click.Choice(list(STATE_STYLES)), show_default=True)
@click.option("--job-outcome", "job_outcomes", multiple=True, type=click.Choice(list(JOB_OUTCOMES)),
              help="Outcome of the next created job (repeat for several).")
@click.option("--finalize-error-mime-type", "finalize_error_mime_types", multiple=True,
              help="Answer upload finalize for this MIME type with HTTP 200 + error body (python-genai #1547).")
@click.option("--config-json", default=None, help="Extra EmulatorConfig fields as a JSON object.")
def command(data_dir: str | None, config_json: str | None, job_outcomes: tuple[str, ...],
            finalize_error_mime_types: tuple[str, ...], **fields: object) -> None:
    """Run a local emulator of the Gemini Developer API batch subset.

    Prints the base URL as the first line on stdout, then serves until interrupted. Point the SDK at it with
    HttpOptions(base_url=URL, api_version="v1beta"). Control API: URL/_emulator/stats, /reset, /config, /clock.
    """
    from .app import Emulator

    extra = json.loads(config_json) if config_json else {}
    cfg = EmulatorConfig(**fields, job_outcomes=list(job_outcomes),  # type: ignore[arg-type]
                         finalize_error_mime_types=list(finalize_error_mime_types), **extra)
    try:
        cfg.validate()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        emu = Emulator(cfg, data_dir=data_dir).start()
    except OSError as exc:  # the port is taken, or the host is not this machine's: one line, no traceback
        for s, h in old.items():
            signal.signal(s, h)
        raise click.ClickException(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}"
                                   + (" (use another --port, or --port 0 for a free one)" if exc.errno == errno.EADDRINUSE else "")) from None
    try:
        click.echo(emu.url)
        sys.stdout.flush()
        click.echo(f"batcher emulator serving at {emu.url} (Ctrl-C to stop)", err=True)
        while not stop.wait(0.5):
            pass
    finally:
        emu.stop()
        for s, h in old.items():
            signal.signal(s, h)
        click.echo("batcher emulator stopped", err=True)
