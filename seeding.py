"""Seeds derived by hashing, the one helper behind every reproducible random stream.

train.py seeds each (seed, step, shard), generate.py each (seed, sample index), probe.py each
(seed, stream, item). Hashing rather than adding offsets means no two streams overlap.
"""
import hashlib


def derive_seed(*parts):
    """A 63-bit seed that is a hash of ``parts`` (ints and strings)."""
    data = "/".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1
