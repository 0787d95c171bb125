"""The volunteer's daemon (hardware probe, task loop, executors, swarm averaging). Not built yet: see issue 5."""
