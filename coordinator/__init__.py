"""The organizer's service: gRPC API (api/), store, scheduler, validators and ledger, metrics, CLI.

Entry point: `mujina-coordinator` (coordinator/cli.py). Imports no torch."""
