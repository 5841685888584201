"""An OpenAI-compatible gateway in front of retrieval-augmented assistants (Inkeep, Nuclia, ...)."""

__version__ = "0.1.0"
