"""The shard value type: how a shard is written, read back, and which keys it holds."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.shard import Shard, shard_index


def test_a_key_lands_in_one_shard_the_same_one_every_time() -> None:
    """sha256 of the key (no hash seed): stable on every machine, roughly even."""
    assert shard_index("atrium/art-deco", 1) == 0
    assert shard_index("atrium/art-deco", 1000) == 343
    keys = [f"r{i}/v{j}" for i in range(100) for j in range(2)]
    counts = Counter(shard_index(k, 4) for k in keys)
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) > 25
    with pytest.raises(ValueError, match="at least 1"):
        shard_index("k", 0)


@given(
    st.integers(1, 64).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n)))
)
def test_label_and_parse_round_trip(pair: tuple[int, int]) -> None:
    shard = Shard(*pair)
    assert Shard.parse(shard.label) == shard
    assert Shard.read(shard.label) == shard
    assert shard.dir_suffix == f"-shard{pair[0]}of{pair[1]}"


@given(
    st.lists(st.text(min_size=1, max_size=20), unique=True, max_size=50),
    st.integers(1, 6),
)
def test_the_shards_of_a_job_partition_its_keys(keys: list[str], count: int) -> None:
    for key in keys:
        assert sum(Shard(i, count).contains(key) for i in range(count)) == 1


@pytest.mark.parametrize("text", ["", "3", "2/2", "-1/2", "0/0", "a/b", "1/2/3"])
def test_malformed_shards_are_refused_with_the_form(text: str) -> None:
    with pytest.raises(ValueError, match="I/N"):
        Shard.parse(text)
    assert Shard.read(text) is None
