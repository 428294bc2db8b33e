"""The router-input sample of `runtime.expert_stats`: spread over every batch, bounded, the same every run."""

import torch

from moecompress.runtime.expert_stats import ExpertStats, _add_sample, _kept


def _fill(calls: int, tokens: int, budget: int) -> ExpertStats:
    st = ExpertStats.empty(4, 3, 2)
    for c in range(calls):  # call c's tokens carry the value c: which call a sampled token came from
        _add_sample(st, torch.full((tokens, 3), float(c)), budget)
    return st


def test_sample_draws_from_every_batch_and_stays_within_budget():
    st = _fill(calls=20, tokens=512, budget=1024)  # tasks are batched apart: the first 2 calls alone fit the budget
    got = torch.cat(st.sample)
    assert 512 <= len(got) <= 1024 and st.seen == 20 * 512
    share = torch.bincount(got[:, 0].long(), minlength=20).float() / len(got)
    assert (share > 0.5 / 20).all() and (share < 2.0 / 20).all()  # every call near its even share
    assert len(torch.cat(st.sample_ids).unique()) == len(got)


def test_sample_is_the_same_every_run_and_levels_nest():
    a, b = _fill(7, 300, 500), _fill(7, 300, 500)
    assert torch.equal(torch.cat(a.sample), torch.cat(b.sample))
    ids = torch.arange(100_000)
    assert (_kept(ids, 3) <= _kept(ids, 2)).all() and abs(float(_kept(ids, 3).float().mean()) - 1 / 8) < 0.01


def test_small_calibration_keeps_every_token():
    st = _fill(calls=3, tokens=10, budget=8192)
    assert len(torch.cat(st.sample)) == 30 and st.sample_level == 0
