"""Every workaround for hivemind 1.1.12 in one place: what we set before it is imported, and a compression it
cannot decode under numpy 2.

Import this module before hivemind (swarm/processes.py and swarm/exchange.py do, at their top): hivemind
reads HIVEMIND_MEMORY_SHARING_STRATEGY once, when it is first imported.
"""

from __future__ import annotations

import os
from functools import cache

# hivemind (imported lazily below) shares its futures' state through torch shared memory, by default with
# torch's "file_system" strategy: a torch_shm_manager process per process, started on first use. A worker
# daemon's main thread once hung inside that start (in C, so its SIGTERM handler never ran: the demo had to
# SIGKILL it; faulthandler's stacks showed torch.storage._share_filename_cpu_ under hivemind.DHT()). Every
# hivemind process here is fork()ed, which "file_descriptor" sharing handles without a manager process.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")


def compressions() -> dict:
    """Compression name (SwarmSettings.compression) -> hivemind compression class."""
    from hivemind.compression import Float16Compression, NoCompression

    return {"fp16": Float16Compression, "8bit": _uniform_8bit(), "none": NoCompression}


@cache
def _uniform_8bit():
    """hivemind 1.1.12's Uniform8BitQuantization, with a decoder that works under numpy 2: the original reads
    the codebook length with int() of a 1-element array, which numpy 2 refuses, so every 8-bit part a peer
    received was lost (and the average silently partial). Registered as hivemind's decoder for UNIFORM_8BIT,
    which is what a receiving peer looks up by the message's compression type."""
    import numpy as np
    import torch
    from hivemind.compression import serialization
    from hivemind.compression.quantization import Uniform8BitQuantization

    class Uniform8Bit(Uniform8BitQuantization):
        def extract(self, serialized_tensor):
            buf = serialized_tensor.buffer
            n = int(np.frombuffer(buf, count=1, dtype=np.int64)[0])
            codebook = np.frombuffer(buf, offset=8, count=n, dtype=self.codebook_dtype)
            quantized = np.frombuffer(buf, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
            indices = torch.from_numpy(quantized.astype(np.int64)).reshape(tuple(serialized_tensor.size))
            values = torch.from_numpy(codebook.copy()).to(dtype=getattr(torch, serialized_tensor.dtype))
            return values[indices].requires_grad_(serialized_tensor.requires_grad)

    serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8Bit()
    return Uniform8Bit
