"""People and their powers: stored users, roles, API keys, sessions, the audit log, and quotas.

Entry points: `users.Directory` (people, keys, sessions, audit), `permissions` (one table of what each role
may do, a rule per route), `quotas.Quotas` (requests per minute and tokens per day, checked before engine work).

May import: the foundation.
"""
