"""Jobs against the API: upload and create them exactly once, feed them in waves, deadlines, the interactive fallback."""
