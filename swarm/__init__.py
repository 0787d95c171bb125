"""Expert-sharded DiLoCo: what the coordinator and the workers share about a swarm round.

A worker holds the shared trunk and some experts of each MoE layer; each module is averaged only among
its holders, the group the coordinator's signed ticket names, then every holder takes the same outer
Nesterov step. The files, bottom up:

    modules.py           module names and their one parser, assignments, holder counts (torch-free)
    settings.py          SwarmSettings, InnerConfig and TrainPayload: the typed contract of a `train` task
                         (torch-free: the coordinator validates payloads without torch)
    memory.py            the peak memory of a round; how many experts fit a budget (torch-free at import)
    tensors.py           a module's tensors in a model; the local model (trunk + held experts); merging
    round_checkpoint.py  round checkpoints (weights + outer momentum) and merging a round's uploads (median)
    uploads.py           what a worker uploads, and the coordinator's check of it before credit (torch-free)
    ticket.py            round tickets: the coordinator's signed word on each module's group and weights (torch-free)
    robust.py            CenteredClip: the aggregate each member computes from the Δs it received
    outer.py             module outcomes, the round report, the outer Nesterov step and failure policies
    hivemind_compat.py   every hivemind 1.1.12 workaround
    processes.py         hivemind's child processes: fork safety, supervision, start_dht
    exchange.py          SwarmExchange: a DHT node (connectivity) and the ticketed exchange of Δs over libp2p
    round.py             SwarmWorker: the worker's round (inner steps, Δ, averaging, outer step)

Imports point one way: this package may import `model`, `data_shards` and hivemind (lazily, in the files
that need it), never `coordinator` or `worker` (tests/test_imports.py).
"""
