"""The HTTP shell: the REST API and the OpenAI-compatible routes, all behind one auth check.

Entry points: `routes.build_api` (the REST routes, with `openai`'s, `embeddings`' and `people`'s), `auth`
(the one check in front of every route, as ASGI middleware), `access` (the access log, ASGI middleware
outside everything), `executors` (the chat and control thread pools: chat never waits behind control
work), `openai_schema` (request bodies as pydantic models).
Routes reach the library through the Workspace and the Serving only.

May import: the foundation, engine (toolcalls), people, workspace, serving.
"""
