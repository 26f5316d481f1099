"""domain-assistant: one base LLM, many domain assistants that their users make better.

Importing this package stays cheap: heavy libraries (torch, transformers, gradio, faiss) are imported
lazily by the modules that need them.
"""

__version__ = "0.1.0"
