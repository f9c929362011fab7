"""The gateway: OpenAI-compatible API, auth, limits, streaming, admin and CLI."""
