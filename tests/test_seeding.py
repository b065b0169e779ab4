"""The one seed helper: deterministic, 63-bit, distinct per stream."""
from seeding import derive_seed


def test_derive_seed_is_deterministic_and_separates_streams():
    seeds = {derive_seed(0, step, shard) for step in range(50) for shard in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2 ** 63 for s in seeds)
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    assert derive_seed("lsep-sample", 0, 5) != derive_seed("lsep-probe", 0, 5)
    assert derive_seed(1, 12) != derive_seed(11, 2)  # parts are separated, not concatenated
