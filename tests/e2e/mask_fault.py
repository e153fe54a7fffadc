"""A mitmdump script for the tests: loaded beside the gateway (`-s`), it makes the
masking engine fail on every scan, as a bug in it would."""

from hoop_addon.masking.engine import Scanner


def _broken(self, text):
    raise RuntimeError("injected masking failure")


Scanner.spans = _broken
