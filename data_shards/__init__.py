"""Text in, token shards out: readers, filters, dedup, the tokenizer, the shard format and `mujina-data
shard`, packing, chat records, the mixture loader, swarm data leases and synthetic-data prompts.

The bottom of the project: imports no other package of it, and, pure like model/, never hivemind, gRPC,
SQLAlchemy or prometheus (tests/test_imports.py, tests/test_purity.py).
"""
