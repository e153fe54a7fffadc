"""The shared state store (scale out): what several gateway processes must see alike.

Today: pending approvals, their decisions and tickets (`approvals`: the interface and
the in-memory backend; `sql`: SQLite and PostgreSQL), chosen by the option
`hoop_state` through `hoop_addon.state.url.open_store`. The tokenize vault and
rate-limit counters are not shared yet.
"""
