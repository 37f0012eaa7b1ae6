"""infersnap: a local LLM server with pinned inference workers on every device, each engine the one measured fastest there."""

__version__ = "0.1.0"
