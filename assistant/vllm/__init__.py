"""vLLM servers as the generation engine (`--engine vllm`): the app stays the front, vLLM generates.

Entry points: `engine.VllmEngine` (the engine interface over one or more servers), `server.ManagedVllm`
(a local vLLM server started and supervised as a child process), `client.VllmClient` (one server's
HTTP API: health, models, runtime LoRA loading); `requests` says an engine request in vLLM's words.

May import: the foundation, engine.
"""
