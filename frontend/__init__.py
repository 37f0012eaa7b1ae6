"""The HTTP frontend: OpenAI API in, internal requests to the broker out."""
