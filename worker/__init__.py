"""The volunteer's daemon: hardware probe, task loop, executors (worker/executors/), swarm averaging."""
