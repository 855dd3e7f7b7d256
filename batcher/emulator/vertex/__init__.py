"""The emulated Vertex AI batch prediction (``batchPredictionJobs`` over Cloud Storage JSONL) and interactive
generateContent, for ``vertexai=True`` clients.

``urls`` (the URL table) -> ``responses`` (HTTP in and out, Bearer auth) -> ``models`` (jobs and their worker).
It uses the shared core and the shared model modules, never the Gemini API service.
"""
