"""The boundary with the API: one interface, the Gemini API and Vertex AI behind it, errors mapped into batcher's."""
