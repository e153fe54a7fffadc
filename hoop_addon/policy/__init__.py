"""Policy as code: the typed model and its YAML loader."""

from hoop_addon.policy.loader import PolicyError, load_policy
from hoop_addon.policy.model import Credential, Issuer, MaskRule, Policy, Route

__all__ = ["Credential", "Issuer", "MaskRule", "Policy", "PolicyError", "Route", "load_policy"]
