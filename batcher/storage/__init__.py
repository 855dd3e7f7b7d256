"""Where images and files live: the content-addressed image cache (local or gs://), Cloud Storage helpers."""
