"""Tell people a request waits for them: one POST per pending approval (and one per
MCP tool whose definition changed, `pin_payload`).

The payload is one JSON object that suits both a generic receiver (`approval`: the
record the control API shows) and a Slack incoming webhook (`text`, Slack mrkdwn).
Everything in `text` that came from the request (subject, path, preview) is made
inert (`hoop_addon.approvals.inert`: controls, line breaks, ANSI and bidi characters
as visible escapes), escaped as Slack documents (`&`, `<`, `>` as entities) and put
inside inline code with its backticks replaced, so a request cannot forge links,
mentions, formatting, reordered text or extra lines ("Approved by ...") in the message.

Sending never decides anything: a webhook that fails is logged and the request keeps
waiting for a human (and is denied at its timeout).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from hoop_addon.approvals.inert import inert

logger = logging.getLogger("hoop")

TIMEOUT_S = 5.0


def slack_quote(value: Any, limit: int = 300) -> str:
    """`value` as inert Slack mrkdwn: one line (controls as visible escapes, see
    `inert`), at most `limit` characters, entities for `&<>`, inside inline code
    (backticks become `'`)."""
    text = inert(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "'")
    return f"`{text}`" if text else "``"


def payload(record: dict[str, Any], control_url: str | None) -> dict[str, Any]:
    """The webhook body for a pending approval `record` (see
    `PendingApproval.record`); `control_url` is where approvers decide, if served."""
    request = record["request"]
    lines = [
        f":raised_hand: Approval needed (rule {slack_quote(record['rule'])}, id {slack_quote(record['id'])})",
        f"Requester: {slack_quote(record['requester'].get('subject'))}",
        f"Request: {slack_quote(request.get('method'))} {slack_quote(request.get('url'))}",
        *([f"MCP call: {slack_quote(call.get('method'))} {slack_quote(call.get('target'))}"]
          if isinstance(call := request.get("mcp"), dict) else []),
        f"Preview (masked): {slack_quote(request.get('preview', ''))}",
        f"Decide before {slack_quote(record['deadline'])}: "
        f"`hoop approvals approve {record['id']}` or `hoop approvals deny {record['id']}`",
    ]
    if control_url:
        lines.append(f"Control API: {slack_quote(control_url)}")
    return {"text": "\n".join(lines), "approval": record}


def pin_payload(change: dict[str, Any], control_url: str | None) -> dict[str, Any]:
    """The webhook body for an MCP tool whose definition changed since it was pinned:
    `change` is `{"route", "tool", "old", "new", "action"}` (fingerprints, never the
    definition's text); `control_url` is where it can be accepted, if served."""
    hidden = change["action"] == "hide"
    lines = [
        f":warning: MCP tool definition changed (route {slack_quote(change['route'])}, tool {slack_quote(change['tool'])})",
        f"Fingerprint: {slack_quote(change['old'])} -> {slack_quote(change['new'])}",
        "Hidden and its calls denied until the new definition is accepted" if hidden else "Still listed and callable (pinning: alert)",
    ]
    if control_url:
        lines.append(f"Review and accept: {slack_quote(control_url + '/mcp/pins')}")
    return {"text": "\n".join(lines), "mcp_tool_changed": change}


async def notify(url: str, body: dict[str, Any]) -> bool:
    """POST `body` as JSON to `url`; True on a 2xx answer. Never raises: failures are
    logged (the approval stays pending)."""
    request = HTTPRequest(
        url, method="POST", body=orjson.dumps(body), headers={"Content-Type": "application/json"},
        request_timeout=TIMEOUT_S, connect_timeout=TIMEOUT_S, follow_redirects=False,
    )
    try:
        await AsyncHTTPClient().fetch(request)
        return True
    except Exception as exc:  # HTTP status, connection, TLS...: notification is best effort
        logger.warning(f"hoop: webhook failed ({exc!r}); it decides nothing (a held request keeps waiting for an approver)")
        return False
