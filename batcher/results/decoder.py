"""Decoder processes for collect: base64 decoding holds the GIL, so one Python process decodes on one core
at most. Each decoder is a small process (`python -m batcher.results.decoder`, standard library only) that reads
result lines straight from the downloaded results file by offset (the collector hands over offsets, never
the megabytes), decodes and verifies the image, writes it into the local cache (temp file, fsync, rename)
and only then reports the line's outcome. The collector records outcomes in the ledger, so "succeeded"
still implies "durable in the cache".

Protocol: one JSON array per line on the decoder's stdin and stdout.
    -> ["job", results_path, cache_root, model, [expected keys]]     (before its lines)
    -> ["line", lineno, start, end]                                  (bytes [start, end) of the file)
    <- [lineno, "blank" | "bad-json"]
    <- [lineno, "unwanted", key]
    <- [lineno, "outcome", key, kind, reason, finish_reason, usage, was_image]     (usage: results.Outcome.usage)
    <- [lineno, "fatal", errno, strerror, filename, message]          (an environment error: disk full, ...)
    <- ["exit", peak_rss_kb]                                         (last, when its stdin has closed)
A decoder exits when its stdin closes (the collector finished, or died: then it finishes the line in hand).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
from typing import Iterable, Iterator

from ..children import child_env, module_command, peak_rss_kb
from ..errors import CollectError

DEPTH = 2  # lines handed to one decoder ahead of its replies: one in work, one waiting
MAX_PROCESSES = 8
ENV_PROCESSES = "BATCHER_COLLECT_PROCESSES"


def default_processes() -> int:
    """Decoder processes for a collect: one per usable CPU (at most 8); BATCHER_COLLECT_PROCESSES overrides
    (0: decode in the collecting process itself, with threads)."""
    env = os.environ.get(ENV_PROCESSES, "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise ValueError(f"{ENV_PROCESSES}={env!r}: expected a whole number of processes (0: none)") from None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_PROCESSES))


class DecoderPool:
    """Decoder processes and the threads that feed them line offsets and read back their replies."""

    def __init__(self, processes: int):
        import subprocess  # here, not at the top: a decoder process does not need it (~1 MB each)

        env = child_env()
        self.procs: list = []
        self.replies: queue.Queue = queue.Queue()
        self.inflight = [0] * processes
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.readers: list[threading.Thread] = []
        self.peak_rss_kb: list[int] = []
        try:
            for i in range(processes):
                p = subprocess.Popen(module_command("results.decoder"), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, close_fds=True)
                self.procs.append(p)
                t = threading.Thread(target=self._read, args=(i, p), name=f"batcher-decoder-{i}", daemon=True)
                t.start()
                self.readers.append(t)
        except BaseException:
            self.close()
            raise

    def _read(self, i: int, p) -> None:
        assert p.stdout is not None
        for raw in p.stdout:
            msg = json.loads(raw)
            if msg[0] == "exit":
                self.peak_rss_kb.append(msg[1])
                continue
            with self.cond:
                self.inflight[i] -= 1
                self.cond.notify()
            self.replies.put(msg)
        self.replies.put(("exited", i))

    def _send(self, i: int, msg: list) -> None:
        stdin = self.procs[i].stdin
        assert stdin is not None
        try:
            stdin.write((json.dumps(msg, separators=(",", ":")) + "\n").encode())
            stdin.flush()
        except (BrokenPipeError, ValueError):  # ValueError: closed by close()
            raise self._exited(i) from None

    def _exited(self, i: int) -> CollectError:
        p = self.procs[i]
        code = p.poll()
        return CollectError(f"decoder process {p.pid} exited unexpectedly{f' (exit code {code})' if code is not None else ''}; "
                            f"nothing is lost: run the same command again")

    def start_job(self, results_path: str, cache_root: str, model: str, expected: Iterable[str]) -> None:
        msg = ["job", str(results_path), str(cache_root), model, list(expected)]
        for i in range(len(self.procs)):
            self._send(i, msg)

    def _feed(self, spans: Iterable[tuple[int, int]]) -> None:
        """Hand each line to the least busy decoder, at most DEPTH lines ahead of its replies."""
        n = 0
        try:
            for start, end in spans:
                n += 1
                with self.cond:
                    while min(self.inflight) >= DEPTH:
                        if self.stop.is_set():
                            return
                        self.cond.wait(0.2)
                    i = self.inflight.index(min(self.inflight))
                    self.inflight[i] += 1
                if self.stop.is_set():
                    return
                self._send(i, ["line", n, start, end])
            self.replies.put(("fed", n))
        except BaseException as exc:  # the download failed: handed to the consumer, raised there
            self.replies.put(("failed", exc))
        finally:
            close = getattr(spans, "close", None)
            if close is not None:
                close()

    def run(self, spans: Iterable[tuple[int, int]]) -> Iterator[list]:
        """Feed `spans` (line offsets in the job's results file, in order; produced in a thread of their own,
        e.g. while downloading) to the decoders and yield their replies as they come, until every line is back."""
        self.stop.clear()
        feeder = threading.Thread(target=self._feed, args=(spans,), name="batcher-download", daemon=True)
        feeder.start()
        fed: int | None = None
        got = 0
        try:
            while fed is None or got < fed:
                msg = self.replies.get()
                if isinstance(msg, tuple):
                    what, value = msg
                    if what == "fed":
                        fed = value
                    elif what == "failed":
                        raise value
                    else:
                        raise self._exited(value)
                    continue
                got += 1
                yield msg
        finally:
            self.stop.set()
            with self.cond:
                self.cond.notify_all()
            feeder.join(timeout=60)

    def close(self, timeout: float = 60.0) -> None:
        """Close the decoders' input and wait for them: a line in hand is finished (its image written) first.
        Each decoder's peak RSS as it reports it at exit (VmHWM) is kept in `peak_rss_kb`."""
        self.stop.set()
        for p in self.procs:
            try:
                if p.stdin:
                    p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout)
            except Exception:  # subprocess.TimeoutExpired
                p.kill()
                p.wait()
        for t in self.readers:
            t.join(timeout=5)
        for p in self.procs:
            if p.stdout:
                p.stdout.close()


# ---- the decoder process ----------------------------------------------------------------------------

def _serve() -> None:
    from .lines import image_meta, read_line
    from ..storage.store import ImageStore, InvalidImage

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the collector's to handle; we stop when it does
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed by accident goes to stderr, never into the replies
    lock = threading.Lock()

    def reply(msg: list) -> None:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        try:
            with lock:
                out.write(data)
                out.flush()
        except BrokenPipeError:  # the collector has gone (killed): its next run does this line again
            os._exit(0)

    def fatal(lineno: int, exc: BaseException) -> None:
        if isinstance(exc, OSError):
            reply([lineno, "fatal", exc.errno, exc.strerror, exc.filename, str(exc)])
        else:
            reply([lineno, "fatal", None, None, None, f"{exc.__class__.__name__}: {exc}"])

    writes: queue.Queue = queue.Queue(maxsize=1)  # decoded images waiting for the writer: bounds memory

    def writer() -> None:
        while (item := writes.get()) is not None:
            lineno, key, o, store, model = item
            try:
                try:
                    store.put(key, o.data, image_meta(model, o))
                    msg = [lineno, "outcome", key, "image", None, o.finish_reason, o.usage, True]
                except InvalidImage as exc:
                    msg = [lineno, "outcome", key, "error", f"returned image is invalid: {exc}", None, [0, 0, 0, 0], True]
                o.data = None
                reply(msg)
            except Exception as exc:
                fatal(lineno, exc)

    t = threading.Thread(target=writer, name="writer", daemon=True)
    t.start()
    fd = -1
    store = None
    model = ""
    expected: set[str] = set()
    try:
        for raw in sys.stdin.buffer:
            msg = json.loads(raw)
            if msg[0] == "job":
                if fd >= 0:
                    os.close(fd)
                _, path, root, model, keys = msg
                fd = os.open(path, os.O_RDONLY)
                store = ImageStore(root)
                expected = set(keys)
                continue
            _, lineno, start, end = msg
            try:
                line = _pread(fd, start, end)
                status, key, o = read_line(line, expected.__contains__)
                del line
                if status != "outcome":
                    reply([lineno, status] if status != "unwanted" else [lineno, status, key])
                elif o.kind == "image":
                    writes.put((lineno, key, o, store, model))
                else:
                    reply([lineno, "outcome", key, o.kind, o.reason, o.finish_reason, o.usage, False])
                del o
            except Exception as exc:
                fatal(lineno, exc)
    finally:
        writes.put(None)
        t.join()
    reply(["exit", peak_rss_kb()])


def _pread(fd: int, start: int, end: int) -> bytes:
    data = os.pread(fd, end - start, start)
    if len(data) == end - start:
        return data
    parts = [data]
    got = len(data)
    while got < end - start:
        more = os.pread(fd, end - start - got, start + got)
        if not more:
            raise OSError(f"results file ends at {start + got}, before the line's end at {end}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


if __name__ == "__main__":
    try:
        _serve()
    except (BrokenPipeError, KeyboardInterrupt):  # the collector has gone
        pass
    sys.stdout = None  # no flush of a closed pipe at exit
