"""Re-authenticating client-replayed recordings, loaded before the gateway by the
`hoop_addon/replay.py` script (`mitmdump -s hoop_addon/replay.py -s hoop_addon/addon.py
-C RECORDING --set hoop_replay_token=JWT`).

Recordings hold no token (it was scrubbed), so replayed requests would be refused by
the gateway's identity stage. This script, loaded before the gateway, gives each
client-replayed request (`flow.is_replay == "request"`: set by mitmproxy's replay, never
by a network client) `Authorization: Bearer <hoop_replay_token>` and drops the recorded
hoop metadata (the original exchange's decisions). The gateway then
applies its whole policy again: identity, route, masking, approvals, recording, audit.
(mitmproxy's `modify_headers` does not apply to replayed flows.)
"""

from __future__ import annotations

from mitmproxy import ctx, http


class ReplayToken:
    """Owns option `hoop_replay_token` (a JWT; empty: replayed requests keep no token)."""

    def load(self, loader) -> None:
        loader.add_option("hoop_replay_token", str, "", "Bearer token given to client-replayed requests.")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.is_replay != "request":
            return
        # The recorded decisions (identity, route, recording, ...) are the original
        # exchange's: the replay must be judged afresh, not inherit them.
        flow.metadata.pop("hoop", None)
        if ctx.options.hoop_replay_token:
            flow.request.headers["Authorization"] = f"Bearer {ctx.options.hoop_replay_token}"
