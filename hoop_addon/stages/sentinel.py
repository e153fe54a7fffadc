"""Never an open proxy: a guard that outlives the `-s` script holding the chain.

mitmproxy can skip or unload a `-s` script without stopping: an option given twice
(`--set hoop_rules=a --set hoop_rules=a`: the deferred option raises while the script
registers, and the script is dropped), a value that fails to parse, a reload of an edited
script that raises, `scripts` changed at run time. The process then keeps running as a
plain proxy, enforcing nothing (and an option whose name is misspelt is kept aside
unapplied, so the setting meant is silently ignored). So the chain's first addon, `ChainGuard`, installs a
`Sentinel` into the master's own addon chain, where no script reload reaches it, and
the Sentinel refuses every flow (503 `gateway_incomplete`) unless the chain it was
given is registered with the master and not unloaded since; before the proxy
serves (its `running` hook), a chain that is not registered, or a `hoop_` option
nobody registered, or an option or mode that relays traffic without an HTTP layer (hosts
passed through or relayed as TCP/UDP, a `reverse:tcp://` or DNS mode: see
`around_the_chain`), is logged as an error, which makes mitmproxy exit with status 1
before accepting traffic; raw TCP and UDP flows are killed whatever the state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
from mitmproxy import exceptions, http
from mitmproxy.addonmanager import traverse

logger = logging.getLogger("hoop")
_state: dict[str, Any] = {"chain": (), "live": set()}  # the chain last loaded; ids of its running stages
# What enforces: a chain of one's own must hold each of these (by class name: the
# stage modules import this one).
REQUIRED = ("PolicyStage", "Identify", "Admit", "Guard", "Mask", "Approve", "InjectCredential", "Record", "Audit", "Restore")


def mark(stage: Any, running: bool) -> None:
    """A stage of the chain was loaded (`running` True) or unloaded (`done`)."""
    (_state["live"].add if running else _state["live"].discard)(id(stage))


def complete(master: Any) -> bool:
    """True when the chain last loaded is registered with `master` and every stage of
    it runs (none unloaded since)."""
    chain = _state["chain"]
    if not chain:
        return False
    registered = {id(a) for a in traverse(master.addons.chain)}
    return all(id(s) in registered and id(s) in _state["live"] for s in chain)


_BYPASS_OPTIONS = {"ignore_hosts", "allow_hosts", "tcp_hosts", "udp_hosts", "mode"}
_HTTP_SCHEMES = {"http", "https", "http3", "tls"}  # reverse-mode upstreams whose traffic is HTTP (tls: HTTP inside)


def around_the_chain(options: Any) -> str | None:
    """What in mitmproxy's `options` would relay traffic without an HTTP layer, so past
    every stage (None when nothing does): hosts passed through (`ignore_hosts`,
    `allow_hosts`), relayed as raw TCP/UDP (`tcp_hosts`, `udp_hosts`), or a mode that
    carries no HTTP (DNS, a `reverse:tcp://`/`udp://`/`dns://` upstream)."""
    for name in ("ignore_hosts", "allow_hosts", "tcp_hosts", "udp_hosts"):
        if getattr(options, name, None):
            return f"option {name} is set"
    for spec in getattr(options, "mode", ()) or ():
        kind, _, rest = spec.partition(":")
        scheme = rest.partition("://")[0] if "://" in rest else "https"
        if kind == "dns" or (kind == "reverse" and scheme not in _HTTP_SCHEMES):
            return f"mode {spec!r} carries traffic that is not HTTP"
    return None


class Sentinel:
    """Installed once per process into the master's addon chain (first). Refuses every
    flow while the hoop chain is incomplete: not registered with the master, or
    unloaded (see the module docstring)."""

    name = "hoop_sentinel"

    def __init__(self, master: Any) -> None:
        self.master = master

    def running(self) -> None:
        # Errors logged here come before the proxy accepts traffic: mitmproxy's
        # ErrorCheck then exits with status 1.
        chain = _state["chain"]
        registered = {id(a) for a in traverse(self.master.addons.chain)}
        pending = sorted(k for k in getattr(self.master.options, "deferred", {}) if k.startswith("hoop_"))
        if not chain or not all(id(s) in registered for s in chain):
            hint = f" (options not applied: {', '.join(pending)}: given twice, or a value that does not parse?)" if pending else ""
            logger.error(f"hoop: the gateway's chain did not load completely{hint}; refusing to run open")
        if bypass := around_the_chain(self.master.options):
            logger.error(f"hoop: {bypass}: that traffic would pass around the chain, unauthenticated and unaudited; refusing to run")
        if pending and chain and all(id(s) in registered for s in chain):
            # every hoop option is registered by now: these are misspelt, and the
            # setting meant (a signing key, a recordings directory) would be ignored
            logger.error(f"hoop: unknown option(s) {', '.join(pending)}; see `mitmdump -s hoop_addon/addon.py --options`")

    def _refuse(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and not complete(self.master):
            logger.error("hoop: the gateway's chain is not loaded; flow refused")
            body = orjson.dumps({"error": "gateway_incomplete", "stage": "sentinel",
                                 "message": "the gateway's enforcement chain is not loaded; nothing is forwarded"})
            flow.response = http.Response.make(503, body, {"Content-Type": "application/json"})

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._refuse(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._refuse(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        self._refuse(flow)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        if not complete(self.master) and flow.websocket is not None:
            flow.websocket.messages[-1].drop()
            flow.kill()

    def configure(self, updated: set[str]) -> None:
        if updated & _BYPASS_OPTIONS and (bypass := around_the_chain(self.master.options)):
            raise exceptions.OptionsError(f"hoop: {bypass}: that traffic would pass around the chain")

    def tcp_start(self, flow: Any) -> None:
        flow.kill()  # bytes that are not HTTP never reach a stage: never relayed

    def udp_start(self, flow: Any) -> None:
        flow.kill()


class ChainGuard:
    """First addon of the chain: remembers the chain and installs the `Sentinel` (once
    per process) when the chain is loaded."""

    def __init__(self, chain: Sequence[Any]) -> None:
        self.chain = tuple(chain)

    def load(self, loader: Any) -> None:
        _state["chain"] = (self, *self.chain)
        for stage in _state["chain"]:  # loaded now; a stage's `done` (unloaded, shutting down) unmarks it
            mark(stage, True)
        if missing := [name for name in REQUIRED if name not in {type(s).__name__ for s in self.chain}]:
            # logged before start-up completes: mitmproxy exits with status 1
            logger.error(f"hoop: the chain lacks stage(s) {', '.join(missing)}: the gateway would not enforce its policy")
            _state["chain"] = (self, *self.chain, object())  # an addon never registered: never complete
        master = loader.master
        if not any(isinstance(a, Sentinel) for a in master.addons.chain):
            # not `addons.add`: registering would apply deferred options again, and the
            # raise that may be under way (an option given twice) must not stop this
            master.addons.chain.insert(0, Sentinel(master))

    def done(self) -> None:
        mark(self, False)


def guarded(chain: Sequence[Any]) -> list[Any]:
    """The `addons` list of a script: `chain` behind a `ChainGuard`."""
    return [ChainGuard(chain), *chain]
