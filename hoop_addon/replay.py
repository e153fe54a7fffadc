"""Re-authenticate client-replayed recordings: `mitmdump -s hoop_addon/replay.py
-s hoop_addon/addon.py -C RECORDING --set hoop_replay_token=JWT` (see
`hoop_addon.stages.replay`)."""

from hoop_addon.stages.replay import ReplayToken

addons = [ReplayToken()]
