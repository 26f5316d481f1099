"""Where the HTTP layer's blocking work runs, off the event loop: two thread pools, so that slow control work
never keeps a chat waiting for a thread.

    await on_chat(fn, *args)      <- what answering needs: admission, the response log's waits, feedback
    await on_control(fn, *args)   <- everything else: activation, imports, curation, exports, training start
                                     and cancel, people, keys and the audit log

A route never uses `asyncio.to_thread` (the loop's one default pool, shared by both kinds of work: six
activations or curations would hold all of it). Each call keeps the caller's context variables, as
`asyncio.to_thread` does.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor

CHAT_THREADS = 32      # admission is quick, but a thread waits on the response log after each answer
CONTROL_THREADS = 4    # activation (minutes on vLLM), curation, exports: beyond this they queue, chats do not

_chat = ThreadPoolExecutor(CHAT_THREADS, thread_name_prefix="chat")
_control = ThreadPoolExecutor(CONTROL_THREADS, thread_name_prefix="control")


async def _run(pool: ThreadPoolExecutor, fn, *args, **kwargs):
    ctx = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(ctx.run, fn, *args, **kwargs))


async def on_chat(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on the chat pool."""
    return await _run(_chat, fn, *args, **kwargs)


async def on_control(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on the control pool."""
    return await _run(_control, fn, *args, **kwargs)
