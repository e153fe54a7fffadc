"""The shared state store (scale out): what several gateway processes must see alike.

Pending approvals, their decisions and tickets (`approvals`: the interface and the
in-memory backend; `sql`: SQLite and PostgreSQL, which create every table), chosen by
the option `hoop_state` through `hoop_addon.state.url.open_store`; the `tokenize`
vault of header and MCP sessions (`vault`, sealed with the gateway secret); rate-limit
and budget counters (`counters`); MCP tool pins (`pins`).
"""
