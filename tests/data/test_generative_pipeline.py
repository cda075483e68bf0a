"""Generative training examples: one per target position, next-M targets and their codes."""

from __future__ import annotations

import numpy as np
import pytest

from onerec_jax.data.pipeline import generative_train_dataset, sample_users
from onerec_jax.data.training_examples import target_examples
from onerec_jax.errors import ConfigError
from tests.data.test_pipeline import HAND, random_data


def reference_examples(data, max_len: int, m: int) -> list[tuple]:
    """(user, history left-padded to max_len, targets padded to m) as the spec words them."""
    out = []
    for u in range(data.n_users):
        h = [int(x) for x in data.sequence(u)[:-2]]  # training part
        for t in range(1, len(h)):
            hist = h[max(0, t - max_len) : t]
            tgt = h[t : t + m]
            out.append(
                (u, (0,) * (max_len - len(hist)) + tuple(hist), tuple(tgt) + (0,) * (m - len(tgt)))
            )
    return out


def all_rows(data, codes, max_len, m, batch_size=1, per_target=True):
    ds = generative_train_dataset(
        data,
        codes,
        max_len=max_len,
        batch_size=batch_size,
        seed=0,
        session_items=m,
        num_epochs=1,
        shuffle=False,
        per_target=per_target,
    )
    return list(ds)


@pytest.mark.parametrize("max_len,m", [(3, 1), (4, 3), (20, 2)])
def test_examples_match_the_spec(max_len, m):
    data = random_data(0, n_users=12, max_items=15)
    codes = np.stack([np.arange(data.n_items + 1) % 5, np.arange(data.n_items + 1) // 5], 1)
    codes[0] = -1  # the padding row, as SemanticIds stores it
    got = []
    for b in all_rows(data, codes, max_len, m):
        assert b["targets"].shape == (1, 1, m) and b["target_codes"].shape == (1, 1, m, 2)
        for r in range(len(b["user"])):
            got.append((int(b["user"][r]), tuple(b["inputs"][r]), tuple(b["targets"][r, 0])))
            # target codes are the targets' code rows; padding targets get zeros and mask False
            real = b["mask"][r, 0]
            np.testing.assert_array_equal(real, b["targets"][r, 0] > 0)
            tc = b["target_codes"][r, 0]
            np.testing.assert_array_equal(tc[real], codes[b["targets"][r, 0][real]])
            assert (tc[~real] == 0).all()
    assert sorted(got) == sorted(reference_examples(data, max_len, m))


def test_session_targets_by_hand():
    # user 0's training part is 1..10; with M=3 the example at t=8 has history 1..8 (last 4),
    # targets 9, 10 and one padding slot (item 11 is validation, never a target).
    ex = target_examples(HAND, max_len=4, session_items=3)
    assert len(ex) == 9 + 0 + 2  # users' training parts have 10, 1 and 3 items
    rows = {
        (int(b["user"][0]), tuple(b["inputs"][0])): tuple(b["targets"][0, 0])
        for b in all_rows(HAND, np.zeros((HAND.n_items + 1, 2), np.int32), 4, 3)
    }
    assert rows[(0, (5, 6, 7, 8))] == (9, 10, 0)
    assert rows[(0, (0, 0, 0, 1))] == (2, 3, 4)
    assert rows[(2, (0, 0, 0, 7))] == (2, 9, 0)
    assert rows[(2, (0, 0, 7, 2))] == (9, 0, 0)


@pytest.mark.parametrize("max_len,m", [(4, 1), (6, 3)])
def test_window_layout_has_the_next_items_at_every_slot(max_len, m):
    """Causal-encoder layout: slot q's targets are the M items after its input, within the
    training part; padding slots have none."""
    data = random_data(2, n_users=8, max_items=14)
    codes = np.stack([np.arange(data.n_items + 1) % 3, np.arange(data.n_items + 1) % 7], 1)
    windows = 0
    for b in all_rows(data, codes, max_len, m, per_target=False):
        u, inputs = int(b["user"][0]), b["inputs"][0]
        h = [int(x) for x in data.sequence(u)[:-2]]
        assert b["targets"].shape == (1, max_len, m)
        for q in range(max_len):
            if inputs[q] == 0:
                assert not b["mask"][0, q].any()
                continue
            i = h.index(int(inputs[q]))  # items are unique per dataset here
            want = h[i + 1 : i + 1 + m]
            assert tuple(b["targets"][0, q]) == tuple(want) + (0,) * (m - len(want))
            np.testing.assert_array_equal(b["target_codes"][0, q, : len(want)], codes[want])
        windows += 1
    assert windows > data.n_users  # long histories give several windows


def test_processes_split_each_global_batch():
    data = random_data(1, n_users=10, max_items=12)
    codes = np.zeros((data.n_items + 1, 3), np.int32)
    kw = dict(max_len=5, batch_size=8, seed=3, num_epochs=1, per_target=True)
    whole = list(generative_train_dataset(data, codes, **kw))
    parts = [
        list(generative_train_dataset(data, codes, process_index=p, process_count=2, **kw))
        for p in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for g, batch in enumerate(whole):
        for key in batch:
            joined = np.concatenate([parts[0][g][key], parts[1][g][key]])
            np.testing.assert_array_equal(joined, batch[key])


def test_codes_of_another_dataset_are_refused():
    with pytest.raises(ConfigError, match="another dataset"):
        generative_train_dataset(HAND, np.zeros((3, 2), np.int32), max_len=4, batch_size=2, seed=0)


def test_validation_sample_is_fixed_and_sorted():
    a, b = sample_users(100, 10, seed=1), sample_users(100, 10, seed=1)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 10 and (np.diff(a) > 0).all()
    assert sample_users(100, 0) is None and sample_users(100, 100) is None
