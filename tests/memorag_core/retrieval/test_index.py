"""VectorIndex: exactness against numpy, IVF recall, metrics, ids, serialization, shards, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from memorag_core.errors import CorruptArtifactError, InvalidInputError, MemoryNotReadyError
from memorag_core.retrieval import IndexConfig, VectorIndex

DIM = 32


@pytest.fixture(scope="module")
def clustered():
    """4000 points around 64 random centres (dim 32), and 200 queries near the points: (4000, 32), (200, 32)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, DIM))  # (64, 32)
    x = centres[rng.integers(0, 64, 4000)] + 0.15 * rng.normal(size=(4000, DIM))  # (4000, 32)
    q = x[rng.integers(0, 4000, 200)] + 0.05 * rng.normal(size=(200, DIM))  # (200, 32)
    return x.astype(np.float32), q.astype(np.float32)


def _recall(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(u) & set(v)) / len(u) for u, v in zip(a, b)]))


def test_flat_ip_and_l2_are_exact(clustered):
    x, q = clustered
    for metric in ("ip", "l2"):
        index = VectorIndex(DIM, IndexConfig(metric=metric))
        index.add(x)
        scores, ids = index.search(q, 5)
        if metric == "ip":
            ref = q @ x.T  # (200, 4000)
            order = np.argsort(-ref, axis=1)[:, :5]
        else:
            ref = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)  # (200, 4000) squared distances
            order = np.argsort(ref, axis=1)[:, :5]
            assert (np.diff(scores, axis=1) >= 0).all(), "l2 scores must ascend (lower is better)"
        assert (ids == order).mean() > 0.99  # ties aside
        np.testing.assert_allclose(scores, np.take_along_axis(ref, ids, 1), rtol=1e-4, atol=1e-3)


def test_ivf_recall_against_flat(clustered):
    x, q = clustered
    flat = VectorIndex(DIM)
    flat.add(x)
    ivf = VectorIndex(DIM, IndexConfig(kind="ivf", nlist=64, nprobe=8))
    ivf.train(x)
    ivf.add(x)
    _, f_ids = flat.search(q, 10)
    _, i_ids = ivf.search(q, 10)
    assert _recall(f_ids, i_ids) >= 0.9
    # nprobe matters: probing every list is exact.
    exact = VectorIndex.from_bytes(ivf.to_bytes(), IndexConfig(kind="ivf", nlist=64, nprobe=64))
    assert _recall(f_ids, exact.search(q, 10)[1]) == 1.0


def test_cosine_normalizes(clustered):
    x, q = clustered
    scaled = x * np.random.default_rng(1).uniform(0.1, 10, size=(len(x), 1)).astype(np.float32)  # (4000, 32)
    index = VectorIndex(DIM, IndexConfig(metric="cosine"))
    index.add(scaled)
    scores, ids = index.search(q * 7.0, 3)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    ref = qn @ xn.T  # (200, 4000) cosine
    np.testing.assert_allclose(scores, np.take_along_axis(ref, ids, 1), atol=1e-5)
    assert (ids[:, 0] == ref.argmax(1)).mean() > 0.99
    assert scores.max() <= 1.0 + 1e-5
    # Plain ip on the scaled vectors ranks differently (favours long vectors): normalization is what differs.
    ip = VectorIndex(DIM, IndexConfig(metric="ip"))
    ip.add(scaled)
    assert (ip.search(q, 3)[1][:, 0] != ids[:, 0]).any()


def test_ids_padding_and_incremental_add():
    x = np.eye(4, DIM, dtype=np.float32)  # (4, 32)
    index = VectorIndex(DIM)
    index.add(x[:2], ids=np.array([100, 7]))
    index.add(x[2:])  # default ids continue from len(): 2, 3
    assert len(index) == 4
    scores, ids = index.search(x, 6)
    assert ids[:, 0].tolist() == [100, 7, 2, 3]
    assert (ids[:, 4:] == -1).all() and np.isneginf(scores[:, 4:]).all()
    assert sorted(index.ids().tolist()) == [2, 3, 7, 100]


def test_serialize_round_trip_identical(clustered):
    x, q = clustered
    for cfg in (IndexConfig(), IndexConfig(kind="ivf", metric="l2", nlist=32, nprobe=4)):
        index = VectorIndex(DIM, cfg)
        index.train(x)
        index.add(x, ids=np.arange(len(x)) * 3)
        data = index.to_bytes()
        assert isinstance(data, bytes) and not data.startswith(b"\x80")  # not a pickle
        again = VectorIndex.from_bytes(data, cfg)
        s1, i1 = index.search(q, 10)
        s2, i2 = again.search(q, 10)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)
        assert len(again) == len(index)


def test_from_bytes_rejects_corrupt_or_mismatched(clustered):
    x, _ = clustered
    index = VectorIndex(DIM)
    index.add(x[:10])
    data = index.to_bytes()
    with pytest.raises(CorruptArtifactError, match="deserialize"):
        VectorIndex.from_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptArtifactError, match="empty"):
        VectorIndex.from_bytes(b"")
    with pytest.raises(CorruptArtifactError, match="config asks for ivf"):
        VectorIndex.from_bytes(data, IndexConfig(kind="ivf"))
    with pytest.raises(CorruptArtifactError, match="l2"):
        VectorIndex.from_bytes(data, IndexConfig(metric="l2"))


def test_sharded_ivf_build_equals_single(clustered):
    x, q = clustered
    cfg = IndexConfig(kind="ivf", nlist=32, nprobe=4)
    trained = VectorIndex(DIM, cfg)
    trained.train(x[::4])  # train once on a sample
    shards = [trained.clone_empty() for _ in range(3)]
    assert all(len(s) == 0 and s.is_trained for s in shards)
    for s, part in zip(shards, np.array_split(np.arange(len(x)), 3)):
        s.add(x[part], ids=part)
    merged = trained.clone_empty()
    for s in shards:
        merged.merge_from(s)
    assert len(merged) == len(x) and all(len(s) > 0 for s in shards)  # shards are left intact
    single = trained.clone_empty()
    single.add(x)
    s1, i1 = single.search(q, 10)
    s2, i2 = merged.search(q, 10)
    np.testing.assert_array_equal(np.sort(i1, 1), np.sort(i2, 1))
    np.testing.assert_allclose(s1, s2, rtol=1e-5)
    # Shards trained separately have different quantizers and must not merge.
    other = VectorIndex(DIM, cfg)
    other.train(x[1::4])
    other.add(x[:5])
    with pytest.raises(InvalidInputError, match="quantizer"):
        merged.merge_from(other)


def test_flat_merge(clustered):
    x, q = clustered
    a, b, whole = VectorIndex(DIM), VectorIndex(DIM), VectorIndex(DIM)
    a.add(x[:2000])
    b.add(x[2000:], ids=np.arange(2000, 4000))
    whole.add(x)
    a.merge_from(b)
    np.testing.assert_array_equal(a.search(q, 5)[1], whole.search(q, 5)[1])
    with pytest.raises(InvalidInputError, match="cannot merge"):
        a.merge_from(VectorIndex(DIM, IndexConfig(metric="l2")))


def test_bad_inputs(clustered):
    x, q = clustered
    ivf = VectorIndex(DIM, IndexConfig(kind="ivf", nlist=64))
    with pytest.raises(InvalidInputError, match="at least nlist=64"):
        ivf.train(x[:10])
    with pytest.raises(MemoryNotReadyError, match="not trained"):
        ivf.add(x)
    with pytest.raises(MemoryNotReadyError, match="train"):
        ivf.clone_empty()
    flat = VectorIndex(DIM)
    with pytest.raises(InvalidInputError, match=r"shape \(n, 32\)"):
        flat.add(np.zeros((3, 16), np.float32))
    flat.add(x[:10])
    with pytest.raises(InvalidInputError, match="k must be"):
        flat.search(q, 0)
    with pytest.raises(InvalidInputError, match=r"shape \(n, 32\)"):
        flat.search(np.zeros((2, 8), np.float32), 3)
    with pytest.raises(InvalidInputError, match="NaN"):
        flat.search(np.full((1, DIM), np.nan, np.float32), 3)
    with pytest.raises(InvalidInputError, match="ids must have shape"):
        flat.add(x[:3], ids=np.arange(2))
    with pytest.raises(InvalidInputError, match="ids must be integers"):
        flat.add(x[:3], ids=np.array([0.5, 1.5, 2.5]))
    with pytest.raises(InvalidInputError, match="empty"):
        flat.add(np.zeros((0, DIM), np.float32))
    with pytest.raises(InvalidInputError, match="dim"):
        VectorIndex(0)
    for bad in (dict(kind="hnsw"), dict(metric="dot"), dict(nlist=0), dict(nprobe=-1)):
        with pytest.raises(InvalidInputError, match="IndexConfig"):
            IndexConfig(**bad)
