"""Stage 0: load the policy and the issuers' keys, swap them in atomically, and reload
them when the policy files change."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import ctx

from hoop_addon.identity.verifier import JwksError, Verifier
from hoop_addon.policy.loader import PolicyError, load_policy
from hoop_addon.policy.model import Policy
from hoop_addon.stages import Stage, logger


@dataclass(frozen=True, slots=True)
class Enforcement:
    """What is in force: a policy and the verifier built from its issuers."""

    policy: Policy
    verifier: Verifier


def _load(path: str) -> Enforcement:
    """Load the policy at `path` and read its issuers' JWKS files (blocking, local; JWKS
    URLs are fetched on the event loop). Raises `PolicyError` or `JwksError`."""
    policy = load_policy(path)
    return Enforcement(policy, Verifier.load(policy.issuers))


def _fingerprint(path: str) -> tuple[tuple[str, int, int], ...]:
    """What identifies the policy files' current state: (name, size in bytes, mtime in
    ns) of the file, or of every entry of the directory; () if the path is missing."""
    root = Path(path)
    try:
        entries = sorted(root.iterdir()) if root.is_dir() else [root]
        return tuple((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in entries)
    except OSError:
        return ()


class PolicyStage(Stage):
    """Owns options `hoop_rules` (a policy file or a directory of `*.yaml`) and
    `hoop_reload` (seconds between checks of the policy files for changes; "0" turns
    hot reload off).

    `active` is None until a policy has loaded; the other stages refuse every flow
    while it is None (fail closed). A changed policy is validated completely, and its
    JWKS fetched once, before it replaces the one in force; a policy that fails is
    refused with its file:line:key, and the previous one keeps enforcing. At start-up
    the JWKS URLs are fetched in the background (`Verifier.prime`): the gateway serves
    at once, refusing an issuer's tokens only until its keys arrive, and a slow IdP
    never holds the event loop (nor SIGTERM).
    """

    def __init__(self) -> None:
        self.active: Enforcement | None = None
        self.reload_interval = 2.0
        self._seen: tuple[tuple[str, int, int], ...] = ()
        self._watcher: asyncio.Task[None] | None = None
        self._priming: asyncio.Task[None] | None = None

    def load(self, loader) -> None:
        loader.add_option("hoop_rules", str, "rules", "Policy file or directory of *.yaml policy files.")
        loader.add_option("hoop_reload", str, "2", "Seconds between checks for policy changes; 0 disables hot reload.")

    def configure(self, updated: set[str]) -> None:
        if "hoop_reload" in updated:
            try:
                interval = float(ctx.options.hoop_reload)
                # 0 turns hot reload off; otherwise at least 0.1 s (1e-9 would make the
                # watcher a busy loop re-reading the policy files) and at most an hour
                if not (interval == 0 or 0.1 <= interval <= 3600):
                    raise ValueError
            except ValueError:
                self.config_error(
                    f"hoop: hoop_reload: '{ctx.options.hoop_reload}' is not a number of seconds: 0 (off) or 0.1..3600"
                )
                return
            self.reload_interval = interval
        if "hoop_rules" in updated:
            seen = _fingerprint(ctx.options.hoop_rules)
            try:
                active = _load(ctx.options.hoop_rules)
            except (PolicyError, JwksError) as exc:
                self.config_error(f"hoop: policy not loaded: {exc}")
                return
            self._swap(active, seen)

    def running(self) -> None:
        super().running()
        if ctx.options.connection_strategy != "lazy":
            # Eager would open upstream connections for CONNECTs before any request in
            # the tunnel is authenticated: unauthenticated callers could make us dial out.
            ctx.options.connection_strategy = "lazy"
            logger.info("hoop: connection_strategy set to lazy: no upstream connection before admission")
        if ctx.options.rawtcp:
            # A tunnel whose bytes are not HTTP would be relayed as raw TCP, past every
            # stage: unauthenticated (the token may be due inside the tunnel), unaudited.
            ctx.options.rawtcp = False
            logger.info("hoop: rawtcp turned off: a tunnel carries HTTP through the chain, or nothing")
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="hoop policy watcher")

    def done(self) -> None:
        for task in (self._watcher, self._priming):
            if task is not None:
                task.cancel()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval or 1.0)
            path = ctx.options.hoop_rules
            if not self.reload_interval or (seen := _fingerprint(path)) == self._seen:
                continue
            self._seen = seen  # a refused version is reported once, not every interval
            try:
                active = await asyncio.to_thread(_load, path)
                await active.verifier.fetch()
            except (PolicyError, JwksError) as exc:
                self._refused(str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - an unexpected error must not end the watcher
                # Were this task to die, later valid changes would never apply; the
                # policy in force keeps enforcing either way (fail closed).
                self._refused(f"unexpected {type(exc).__name__}: {exc}")
                continue
            self._swap(active, seen)

    def _refused(self, reason: str) -> None:
        kept = self.active.policy.digest[:12] if self.active else "none"
        logger.error(f"hoop: policy reload refused, policy {kept} keeps enforcing: {reason}")

    def _swap(self, active: Enforcement, seen: tuple[tuple[str, int, int], ...]) -> None:
        self.active, self._seen = active, seen
        if self._priming is not None:
            self._priming.cancel()  # the keys of a policy no longer in force
        try:
            self._priming = asyncio.get_running_loop().create_task(active.verifier.prime(), name="hoop JWKS fetch")
        except RuntimeError:  # no event loop (a policy loaded outside the proxy): keys are fetched on first use
            self._priming = None
        policy = active.policy
        logger.info(
            f"hoop: policy {policy.digest[:12]} in force, from {len(policy.files)} file(s): "
            f"{len(policy.routes)} route(s), {len(policy.issuers)} issuer(s)"
        )

