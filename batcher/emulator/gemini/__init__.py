"""The emulated Gemini Developer API (``generativelanguage.googleapis.com``): the Files API (resumable upload, get,
list, delete, download), the Batch API and interactive generateContent.

``urls`` (the URL table) -> ``responses`` (HTTP in and out) -> ``models`` (files, uploads, batches and the batch
worker), and ``webhooks`` (the end of a batch POSTed to its listeners). It uses the shared core and the shared
model modules, never the Vertex AI service.
"""
