"""The gateway's chain of stages, built once per process: what `hoop_addon/addon.py`
gives mitmdump as a script and what `hoop serve` adds to its master itself.

In hook order: protected-resource metadata (RFC 9728, for MCP routes: served
without a token) -> identify -> admit (route) -> AWS unsign (de-chunk, drop the agent's
signature; `aws_sigv4` routes) -> guard (block rules; approval needed?) -> MCP calls
(tool rules; tools/list answers filtered) -> mask request -> rate limits and budgets ->
approve (hold or ticket) -> inject credential -> upstream -> mask response -> MCP server
messages (each event of an MCP stream judged, see `McpStream`) -> count the
response's token usage -> record
-> audit -> telemetry (metrics, decision log) -> restore (tokenized values, for the
client only). (Rate limits count requests in `requestheaders`, before any body is
read; they sit after masking so as to read a stream's usage as masking emits it.)
A `ChainGuard` goes first: it keeps the process from ever serving without this whole
chain (see `hoop_addon.stages.sentinel`).
"""

from __future__ import annotations

from typing import Any

from hoop_addon.stages.admit import Admit
from hoop_addon.stages.approve import Approve
from hoop_addon.stages.audit import Audit
from hoop_addon.stages.control import Control
from hoop_addon.stages.credentials import AwsUnsign, InjectCredential
from hoop_addon.stages.guard import Guard
from hoop_addon.stages.identify import Identify
from hoop_addon.stages.limit import RateLimit
from hoop_addon.stages.mask import Mask, Restore
from hoop_addon.stages.mcp import Mcp, McpStream
from hoop_addon.stages.metadata import ResourceMetadata
from hoop_addon.stages.policy import PolicyStage
from hoop_addon.stages.record import Record
from hoop_addon.stages.sentinel import guarded
from hoop_addon.stages.telemetry import Telemetry


def build() -> list[Any]:
    """A new chain: the list of addon instances, `ChainGuard` first, to add to a
    mitmproxy master in this order (all of them, once)."""
    policy = PolicyStage()
    audit = Audit(policy)  # stages that report events (approvals, ...) take it as an argument
    control = Control()  # the control API; stages add their handlers to it
    approve = Approve(policy, control, audit)  # opens the state store; Telemetry's /healthz reports it
    mask = Mask(lambda: approve.queue.store)  # Restore, last, puts tokenized values back after recording and audit
    mcp = Mcp(policy, mask, audit, control, approve.authenticate)  # pins are accepted with approvers' tokens
    return guarded([
        policy, ResourceMetadata(policy), Identify(policy, mask), Admit(policy), AwsUnsign(), Guard(policy, mask), mcp,
        mask, McpStream(mcp), RateLimit(policy, mask), approve, InjectCredential(mask), Record(policy, audit), audit, control,
        Telemetry(policy, audit, control, approve), Restore(mask),
    ])
