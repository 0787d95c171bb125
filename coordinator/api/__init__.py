"""The coordinator/worker protocol: mujina.proto, its generated modules and a typed client.

The worker imports this package and nothing else of the coordinator."""
