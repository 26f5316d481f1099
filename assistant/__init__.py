"""domain-assistant: one base LLM, many domain assistants that their users make better.

Importing this package has no process-wide effects and stays cheap: heavy libraries (torch,
transformers, gradio, faiss) are imported lazily by the modules that need them. The CPU thread policy
(assistant/engine/threads.py) is applied by the entry points: the CLI, the training job's process, the tests'
and benchmarks' setup.
"""

__version__ = "0.1.0"
