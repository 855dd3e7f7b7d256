"""Collecting results: download (streamed, resumable), one results line at a time, decoder processes.

Kept light: the decoder processes import `batcher.results.decoder` and `batcher.results.lines` and nothing heavier."""
