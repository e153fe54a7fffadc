"""A mitmdump script for the tests: loaded beside the gateway (`-s`), it makes a stage
fail the way an unexpected bug would, where `HOOP_FAULT` says: `route` (route matching,
before the upstream) or `record` (recording, after it)."""

import os

from hoop_addon.policy.model import Policy
from hoop_addon.evidence.recording import SessionRecording


def _broken(*args, **kwargs):
    raise RuntimeError("injected stage failure")


if os.environ["HOOP_FAULT"] == "route":
    Policy.route_for = _broken
else:
    SessionRecording.add = _broken
