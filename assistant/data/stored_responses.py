"""Responses kept for `previous_response_id` and `GET /v1/responses/{id}` (the Responses API's `store`).

A stored response is the Response object as it was answered and the conversation it closed, in chat turns
(the request's input after its predecessor's conversation, then the answer; never the `instructions`, which
OpenAI does not carry over). Its owner is who authenticated: only they (or an admin) read it or continue
from it, as with a rating. The id is the one the answer is logged and rated under.
"""

from __future__ import annotations

import json
import time


class StoredResponses:
    def __init__(self, store):
        self.store = store

    def put(self, response_id: str, owner: str | None, conversation: list[dict], body: dict) -> None:
        self.store._write(lambda c: c.execute(
            "INSERT INTO stored_responses (id, owner, created_at, conversation, body) VALUES (?,?,?,?,?)",
            (response_id, owner, time.time(), json.dumps(conversation, ensure_ascii=False),
             json.dumps(body, ensure_ascii=False))))

    def get(self, response_id: str) -> dict | None:
        """{id, owner, created_at, conversation, body}, or None."""
        rows = self.store._read("SELECT id, owner, created_at, conversation, body FROM stored_responses WHERE id = ?",
                                (response_id,))
        if not rows:
            return None
        r = rows[0]
        return {"id": r[0], "owner": r[1], "created_at": r[2], "conversation": json.loads(r[3]),
                "body": json.loads(r[4])}

    def delete(self, response_id: str) -> bool:
        return self.store._write(lambda c: c.execute("DELETE FROM stored_responses WHERE id = ?",
                                                     (response_id,)).rowcount > 0)
