"""Processes that share one database and adapters folder: who is alive and how they reach each other.

Entry points: `members` (worker names, the worker lock, wake-ups, activation requests from workers),
`coordination.Coordination` (what replicas and workers tell each other through the database: channels, activation
records), `remote.activate` (the one path to live from a process that is not the server: it asks the running
server, recognised by its pid and control token).

May import: the foundation.
"""
