"""infersnap: a local LLM server with one pinned inference worker per device."""

__version__ = "0.1.0"
