"""Stage 0: load the policy and the issuers' keys, and swap them in atomically."""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import ctx

from hoop_addon.identity import JwksError, Verifier
from hoop_addon.policy import Policy, PolicyError, load_policy
from hoop_addon.stages import Stage, logger


@dataclass(frozen=True, slots=True)
class Enforcement:
    """What is in force: a policy and the verifier built from its issuers."""

    policy: Policy
    verifier: Verifier


class PolicyStage(Stage):
    """Owns option `hoop_rules` (a policy file or a directory of `*.yaml`).

    `active` is None until a policy has loaded; the other stages refuse every flow
    while it is None (fail closed).
    """

    def __init__(self) -> None:
        self.active: Enforcement | None = None

    def load(self, loader) -> None:
        loader.add_option("hoop_rules", str, "rules", "Policy file or directory of *.yaml policy files.")

    def configure(self, updated: set[str]) -> None:
        if "hoop_rules" not in updated:
            return
        try:
            policy = load_policy(ctx.options.hoop_rules)
            verifier = Verifier.load(policy.issuers)
        except (PolicyError, JwksError) as exc:
            self.config_error(f"hoop: policy not loaded: {exc}")
            return
        self.active = Enforcement(policy, verifier)
        logger.info(
            f"hoop: policy {policy.digest[:12]} loaded from {len(policy.files)} file(s): "
            f"{len(policy.routes)} route(s), {len(policy.issuers)} issuer(s)"
        )

    def running(self) -> None:
        super().running()
        if ctx.options.connection_strategy != "lazy":
            # Eager would open upstream connections for CONNECTs before any request in
            # the tunnel is authenticated: unauthenticated callers could make us dial out.
            ctx.options.connection_strategy = "lazy"
            logger.info("hoop: connection_strategy set to lazy: no upstream connection before admission")
