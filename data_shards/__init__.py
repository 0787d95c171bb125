"""Text in, token shards out (filters, dedup, tokenizer, shards, packing, mixture). Not built yet: see issue 3.

Pure like model/: never imports hivemind, gRPC, SQLAlchemy or prometheus.
"""
