"""hoop_addon: an identity-aware gateway for AI agents' traffic, as mitmproxy addons."""
