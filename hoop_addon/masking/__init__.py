"""Masking: the engine (`engine`), SSE streams (`sse`), the tokenize vault (`vault`)
and bounded decoding of content-encoded bodies (`codec`)."""

from hoop_addon.masking.engine import Evidence, MaskContext, MaskError, Scanner, mask_body, mask_json, mask_text
from hoop_addon.masking.sse import EventStreamMasker
from hoop_addon.masking.vault import TokenSession, Vault

__all__ = [
    "EventStreamMasker",
    "Evidence",
    "MaskContext",
    "MaskError",
    "Scanner",
    "TokenSession",
    "Vault",
    "mask_body",
    "mask_json",
    "mask_text",
]
