"""Who watches what inside one instance: the owner of the precise watch set and the tier planner.

Above `feeds/` and `tracking/` (it drives both), below `cluster/` (which sends it intents) and `ops/`.
"""
