"""The OpenAI-compatible HTTP server: protocol (request validation, plain values) and app (Starlette routes)."""
