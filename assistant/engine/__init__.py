"""Generation in this process: the base model and the engine that serves it.

Entry points: `engine.Engine` (continuous batching across LoRA adapters, streaming, cancellation) and
`protocol.EngineProtocol` (the interface `Serving` asks of any engine, this one or vLLM's); `model.load_base`
(the only place that builds a quantization config); `request.Request` (what an engine serves);
`textstream` (a conversation's prompt ids, generated ids to streamed text); `lm` (chat and loss helpers
that training and evaluation share); `threads` (the one OpenMP team).
Behind them: runner (our Llama forward, KV cache), lora (many adapters on one base), kernels + kernels.c
(CPU decode), graph_step (CUDA graphs), waiting (the fair waiting room), sampling, logits, choices,
grammar (xgrammar), toolcalls, chat_options.

May import: the foundation (settings, errors, files).
"""
