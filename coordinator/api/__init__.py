"""The coordinator/worker protocol (mujina.proto). Not built yet: see issue 4."""
