"""domain-assistant: one base LLM, many domain assistants that their users make better.

Importing this package stays cheap: heavy libraries (torch, transformers, gradio, faiss) are imported
lazily by the modules that need them. Importing it does set the process's default CPU thread count for
torch to one (when torch is not loaded yet and OMP_NUM_THREADS is unset); see assistant/threads.py.
"""

__version__ = "0.1.0"

from . import threads as _threads

_threads.defaults()   # before torch is imported anywhere: see assistant/threads.py
