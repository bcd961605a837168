"""The blend sampler: proportions, length buckets, transitions, QA, cutting, resume, DP layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmtrain.config import ConfigError, DataConfig
from mmtrain.data.blend import BlendLoader, feistel_permute
from mmtrain.data.indexed import write_documents
from mmtrain.data.mixture import mixture_at, qa_at
from mmtrain.train.schedules import BatchSchedule


def _prefix(tmp_path, name, lengths, base, seed=0):
    """Documents of the given lengths; every token of prefix ``name`` is in [base, base+50) and
    each document ends with 255 (an "EOS")."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(base, base + 50, size=n - 1), 255) for n in lengths]
    return write_documents(str(tmp_path / name), docs, np.uint16), docs


def _loader(cfg, G=8, steps=100, m=None, rank=0, dp=1, sched=None):
    sched = sched or BatchSchedule(cfg.seq_len, G)
    return BlendLoader(cfg, sched, steps, m or G // dp, rank, dp, vocab_size=258)


def _source_of(tokens_row):
    """'a' when the row's tokens lie in [0, 50), 'b' in [100, 150) (255 = EOS ignored)."""
    t = tokens_row[tokens_row != 255]
    return "a" if t.max() < 50 else "b" if t.min() >= 100 else "mixed"


def test_feistel_is_a_permutation():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        p = feistel_permute(np.arange(n), n, key=12345)
        assert sorted(p.tolist()) == list(range(n))
    a, b = feistel_permute(np.arange(500), 500, 1), feistel_permute(np.arange(500), 500, 2)
    assert a.tolist() != b.tolist() and a.tolist() != list(range(500))


def test_blend_draws_rows_in_proportion(tmp_path):
    a, _ = _prefix(tmp_path, "a", [20] * 200, 0)
    b, _ = _prefix(tmp_path, "b", [30] * 200, 100)
    cfg = DataConfig(blend=[0.3, a, 0.7, b], seq_len=16)
    ld = _loader(cfg, G=50)
    srcs = []
    for _ in range(60):  # 3000 rows
        for batch in ld.next_step():
            srcs += [_source_of(r) for r in batch.tokens.numpy()]
    n = len(srcs)
    frac_a = srcs.count("a") / n
    assert srcs.count("mixed") == 0
    sigma = (0.3 * 0.7 / n) ** 0.5
    assert abs(frac_a - 0.3) < 4 * sigma, frac_a


def test_same_seed_same_rows_other_seed_other_rows(tmp_path):
    a, _ = _prefix(tmp_path, "a", [20] * 100, 0)
    b, _ = _prefix(tmp_path, "b", [30] * 100, 100)
    rows = {}
    for seed in (1, 1, 2):
        cfg = DataConfig(blend=[0.5, a, 0.5, b], seq_len=16, seed=seed)
        ld = _loader(cfg)
        rows.setdefault(seed, []).append(np.concatenate([x.tokens for x in ld.next_step()]))
    np.testing.assert_array_equal(rows[1][0], rows[1][1])
    assert not np.array_equal(rows[1][0], rows[2][0])


def test_resume_after_kill_gives_the_identical_next_batch(tmp_path):
    """The state goes through JSON (as in a checkpoint); a fresh loader — a new process after a
    kill — continues with exactly the batches the uninterrupted loader produces."""
    a, _ = _prefix(tmp_path, "a", list(range(3, 90)) * 3, 0)
    b, _ = _prefix(tmp_path, "b", [40] * 120, 100)
    cfg = DataConfig(blend=[0.4, a, 0.6, b], seq_len=32, mixture=None)
    ref = _loader(cfg, G=4)
    ref_batches = [ref.next_step() for _ in range(12)]
    first = _loader(cfg, G=4)
    for _ in range(5):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))
    del first
    again = _loader(cfg, G=4)
    again.load_state_dict(state)
    for s in range(5, 12):
        got = again.next_step()
        for x, y in zip(got, ref_batches[s]):
            for f in ("tokens", "labels", "loss_mask", "cu_seqlens", "position_ids"):
                assert np.array_equal(getattr(x, f), getattr(y, f)), (s, f)


def test_dp2_ranks_disjoint_union_is_the_single_process_batch(tmp_path):
    a, _ = _prefix(tmp_path, "a", list(range(5, 70)), 0)
    b, _ = _prefix(tmp_path, "b", [25] * 80, 100)
    cfg = DataConfig(blend=[0.5, a, 0.5, b], seq_len=24)
    one = _loader(cfg, G=8, m=2)
    ranks = [_loader(cfg, G=8, m=2, rank=r, dp=2) for r in range(2)]
    for _ in range(6):
        single = np.concatenate([x.tokens for x in one.next_step()])
        parts = [np.concatenate([x.tokens for x in ld.next_step()]) for ld in ranks]
        np.testing.assert_array_equal(np.concatenate(parts), single)
        # disjoint: the two ranks' rows are different pieces of the data
        plan_rows = {tuple(r) for r in parts[0].tolist()}
        assert not plan_rows & {tuple(r) for r in parts[1].tolist()}
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


def test_rows_cut_long_documents_and_mark_boundaries(tmp_path):
    """A document longer than the row continues in the next row; cu_seqlens cut at document
    starts, position ids restart, and the label that starts a document is masked."""
    lengths = [5, 70, 9]
    p, docs = _prefix(tmp_path, "a", lengths, 0)
    cfg = DataConfig(blend=[1.0, p], seq_len=16)
    ld = _loader(cfg, G=1, m=1)
    order = [int(d) for d in feistel_permute(np.arange(3), 3, ld._perm_key("m", 0, 0))]
    stream = np.concatenate([docs[d] for d in order])
    starts = np.cumsum([0] + [lengths[d] for d in order])[:-1]
    for r in range(5):  # 80 tokens: every document, the long one over several rows
        batch = ld.next_step()[0]
        want = stream[r * 16:r * 16 + 17]
        assert batch.tokens[0].tolist() == want[:-1].tolist()
        assert batch.labels[0].tolist() == want[1:].tolist()
        inner = [s - r * 16 for s in starts if r * 16 < s < r * 16 + 16]
        assert batch.cu_seqlens.tolist() == [0, *inner, 16]
        masked = [i for i in range(16) if batch.loss_mask[0, i] == 0]
        assert masked == [s - r * 16 - 1 for s in starts if r * 16 < s <= r * 16 + 16]
        for s in inner:
            assert batch.position_ids[0, s] == 0


def test_length_buckets_follow_the_mixture(tmp_path):
    # short < 10 <= medium <= 40 < long
    lengths = [6] * 300 + [25] * 100 + [60] * 50
    p, _ = _prefix(tmp_path, "a", lengths, 0)
    cfg = DataConfig(blend=[1.0, p], seq_len=8, length_bounds=[10, 40], mixture=[0.2, 0.0, 0.8])
    ld = _loader(cfg, G=100)
    buckets = []
    for _ in range(10):
        plan = ld.plan_step(ld.step)
        ld.step += 1
        for src, pieces, _ in plan:
            n = {int(src.reader.lengths[d]) for d, _, _ in pieces}
            assert len({0 if x < 10 else 2 if x > 40 else 1 for x in n}) == 1  # one bucket a row
            buckets.append(0 if max(n) < 10 else 2 if min(n) > 40 else 1)
    n = len(buckets)
    assert buckets.count(1) == 0
    assert abs(buckets.count(2) / n - 0.8) < 4 * (0.16 / n) ** 0.5


def test_mixture_interpolates_across_the_transition_and_qa_in_the_last_window():
    cfg = DataConfig(mixture=[0.3, 0.3, 0.4], mixture_from=[0.35, 0.35, 0.3], transition=0.1,
                     qa_fraction=0.1, qa_window=0.2)
    assert mixture_at(cfg, 0.0) == pytest.approx([0.35, 0.35, 0.3])
    assert mixture_at(cfg, 0.05) == pytest.approx([0.325, 0.325, 0.35])
    assert mixture_at(cfg, 0.1) == pytest.approx([0.3, 0.3, 0.4])
    assert mixture_at(cfg, 0.7) == pytest.approx([0.3, 0.3, 0.4])
    assert [qa_at(cfg, p) for p in (0.0, 0.79, 0.8, 0.99)] == [0.0, 0.0, 0.1, 0.1]


def test_qa_component_only_in_the_last_window(tmp_path):
    a, _ = _prefix(tmp_path, "a", [12] * 300, 0)
    q, _ = _prefix(tmp_path, "qa", [12] * 300, 100)
    cfg = DataConfig(blend=[1.0, a], qa_blend=[1.0, q], qa_fraction=0.1, qa_window=0.2,
                     seq_len=8)
    steps = 50
    ld = _loader(cfg, G=100, steps=steps)
    early, late = [], []
    for s in range(steps):
        rows = np.concatenate([x.tokens for x in ld.next_step()])
        (late if s >= 40 else early).extend(_source_of(r) == "b" for r in rows)
    assert sum(early) == 0
    n = len(late)
    assert abs(sum(late) / n - 0.1) < 4 * (0.09 / n) ** 0.5


def test_mixture_and_qa_errors_name_the_field(tmp_path):
    p, _ = _prefix(tmp_path, "a", [6] * 50, 0)
    with pytest.raises(ConfigError, match=r"^data\.mixture: the long bucket has weight 0\.5"):
        _loader(DataConfig(blend=[1.0, p], seq_len=8, length_bounds=[10, 40],
                           mixture=[0.5, 0.0, 0.5]))
    with pytest.raises(ConfigError, match=r"^data\.qa_blend: "):
        _loader(DataConfig(blend=[1.0, p], seq_len=8, qa_fraction=0.1))
    with pytest.raises(ConfigError, match=r"^data\.blend: .*weight/prefix pairs"):
        DataConfig(blend=[0.3, p, 0.7]).validate()
    with pytest.raises(ConfigError, match=r"^data\.mixture: expected three weights"):
        DataConfig(mixture=[1.0, 2.0]).validate()


def test_batch_schedule_steps_consume_growing_batches(tmp_path):
    a, _ = _prefix(tmp_path, "a", [30] * 100, 0)
    cfg = DataConfig(blend=[1.0, a], seq_len=8)
    sched = BatchSchedule(8, 2, ((0, 2), (40, 4), (100, 8)))  # rows 2 until 40 tokens, ...
    ld = _loader(cfg, sched=sched, m=2)
    sizes = [sum(x.num_rows for x in ld.next_step()) for _ in range(8)]
    assert sizes == [2, 2, 2, 4, 4, 8, 8, 8]  # steps start at 0,16,32 | 48,80 | 112,...
    assert ld.consumed_rows == sum(sizes) == sched.rows_before(8)
