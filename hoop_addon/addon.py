"""The gateway as a mitmdump script: `mitmdump -s hoop_addon/addon.py --set hoop_rules=rules`,
for users who compose the chain with addons of their own (`hoop serve` is the front
door: the same chain, built into the process). The chain is `hoop_addon.stages.chain`;
its first addon keeps the process from serving without all of it, whichever way mitmproxy
skips or unloads this script (see `hoop_addon.stages.sentinel`).
"""

from hoop_addon.stages.chain import build

addons = build()
