"""The organizer's service (gRPC API, store, scheduler, ledger, metrics). Not built yet: see issue 4."""
