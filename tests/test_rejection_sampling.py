"""The bookkeeping of rejection-sampling rounds against hand-computed values: the best of K, the round report, the
pool that keeps the best response ever seen per prompt, and its JSONL file."""

import numpy as np
import pytest

from jaxalign import rejection_sampling as rs
from jaxalign.errors import JaxalignError

A = [{"role": "user", "content": "a"}]
B = [{"role": "user", "content": "b"}]
C = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]


def test_best_samples_takes_the_first_of_equal_scores():
    scores = np.array([[0.1, 0.9, 0.9], [-2.0, -3.0, -1.0]])
    np.testing.assert_array_equal(rs.best_samples(scores), [1, 2])
    with pytest.raises(ValueError, match="prompts, samples"):
        rs.best_samples(np.zeros(3))


def test_round_statistics():
    scores = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    # best 6 and 3; medians 2 and 0: gains 4 and 3
    assert rs.round_statistics(scores) == pytest.approx({
        "sample_score_mean": 2.0, "sample_score_max": 6.0, "best_score_mean": 4.5, "best_minus_median": 3.5})


def test_the_pool_keeps_the_best_response_ever_seen_per_prompt():
    round_1 = rs.merge({}, [rs.PoolEntry(A, "a1", 0.5, 1), rs.PoolEntry(B, "b1", 2.0, 1)])
    round_2 = rs.merge(round_1, [rs.PoolEntry(A, "a2", 0.7, 2), rs.PoolEntry(B, "b2", 1.0, 2),
                                 rs.PoolEntry(C, "c2", -1.0, 2)])
    assert {e.completion for e in round_2.values()} == {"a2", "b1", "c2"}  # C differs from A by its system turn
    tie = rs.merge(round_2, [rs.PoolEntry(A, "a3", 0.7, 3)])
    assert tie[rs.prompt_key(A)].completion == "a2"  # an equal score does not replace the earlier entry
    assert {e.completion for e in round_1.values()} == {"a1", "b1"}  # merging leaves the old pool as it was


def test_pool_file_round_trip_and_bad_lines(tmp_path):
    pool = rs.merge({}, [rs.PoolEntry(B, "b", 2.0, 1), rs.PoolEntry(A, "a ü", 0.5, 2)])
    rs.write_pool(tmp_path / "pool.jsonl", pool)
    assert rs.read_pool(tmp_path / "pool.jsonl") == pool
    assert not (tmp_path / "pool.jsonl.partial").exists()
    lines = (tmp_path / "pool.jsonl").read_text().splitlines()
    assert lines[0].startswith('{"prompt": [{"role": "user", "content": "a"}], "completion": "a ü"')
    (tmp_path / "bad.jsonl").write_text(lines[0] + '\n{"prompt": [], "text": "x"}\n')
    with pytest.raises(JaxalignError, match=r"bad.jsonl:2: not a pool entry"):
        rs.read_pool(tmp_path / "bad.jsonl")
