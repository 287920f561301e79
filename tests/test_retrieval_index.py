"""FAISS indexes: choosing, recall against exact search, add / remove, damage, atomic writes, shards."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from compress_edge.retrieval import faiss_index, sidecar
from compress_edge.retrieval import index as rindex
from compress_edge.retrieval.index import (
    RetrievalIndex,
    build_index_from_array,
    choose_index,
    exact_knn,
    open_index,
    parse_bytes,
    plan_index,
    recall_at,
)
from compress_edge.retrieval.shards import (
    EmbeddingStore,
    Gallery,
    ShardWriter,
    extract_embeddings,
    l2_normalize,
    wait_for_manifests,
    write_embeddings,
)

from compress_edge.errors import CompressEdgeError, IndexFileError, SpecMismatchError
from compress_edge.eval import neighbors
from compress_edge.models.spec import ModelSpec


def clusters(n: int, d: int = 32, centres: int = 40, noise: float = 0.35, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    labels = rng.integers(0, centres, n)
    x = c[labels] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return l2_normalize(x), labels


def brute_force(xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(l2_normalize(xq) @ l2_normalize(xb).T), axis=1, kind="stable")[:, :k]


# -- choosing ----------------------------------------------------------------------------------------
def test_auto_choice_follows_size_and_memory():
    assert choose_index(5_000, 128).key == "IDMap2,Flat"
    assert "HNSW32" in choose_index(100_000, 128, 8 << 30).key
    big = choose_index(1_000_000, 128, 8 << 30)
    assert big.key.startswith("IVF") and big.key.endswith(",Flat")
    sq8 = choose_index(1_000_000, 128, 200 << 20)
    assert sq8.key.endswith(",SQ8") and not sq8.on_disk
    pq = choose_index(1_000_000, 128, 48 << 20)
    assert pq.key.startswith("OPQ") and ",PQ" in pq.key
    disk = choose_index(1_000_000, 128, 1 << 20)
    assert disk.on_disk and disk.key.endswith(",SQ8")
    # HNSW only where it fits
    assert not choose_index(100_000, 128, 20 << 20).key.startswith("IDMap,HNSW")
    for plan in (big, sq8, pq, disk):
        assert 4 * math.sqrt(1e6) <= plan.nlist <= 16 * math.sqrt(1e6)
        assert 30 * plan.nlist <= plan.train_points <= 256 * plan.nlist
        assert plan.est_bytes <= (8 << 30)


def test_plan_for_a_factory_string_and_bad_inputs():
    plan = plan_index("IVF256,SQ8", 50_000, 64)
    assert plan.nlist == 256 and plan.train_points == 64 * 256
    with pytest.raises(IndexFileError, match="only IVF"):
        plan_index("HNSW32,Flat", 50_000, 64, on_disk=True)
    with pytest.raises(CompressEdgeError, match="between 30 and 256"):
        plan_index("auto", 50_000, 64, points_per_centroid=10)
    with pytest.raises(IndexFileError, match="index_factory"):
        rindex.make_faiss_index("NotAnIndex12", 16)
    assert parse_bytes("512M") == 512 << 20
    assert parse_bytes("1.5GB") == int(1.5 * (1 << 30))
    assert parse_bytes("auto") is None
    with pytest.raises(CompressEdgeError, match="512M"):
        parse_bytes("lots")


# -- recall against exact search ------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["HNSW32,Flat", "IVF32,Flat", "IVF32,SQ8"])
def test_tuned_index_meets_target_recall_against_exact_search(tmp_path, key):
    both, _ = clusters(4200)
    x, xq = both[:4000], both[4000:]
    idx = build_index_from_array(x, tmp_path / "idx", index=key, queries=300, target_recall=0.95)
    tuning = idx.meta["tuning"]
    assert tuning["target_met"], tuning["sweep"]
    assert tuning["recall_at_10"] >= 0.95
    assert tuning["held_out"] and tuning["queries"] == 300
    assert tuning["qps_1_thread"] > 0 and tuning["qps_all_threads"] > 0
    assert tuning["bytes_per_vector"] > 0 and tuning["index_bytes"] > 0
    param = rindex.search_parameter(idx.index)
    assert set(idx.search_params) == {param}
    # Independent check on fresh queries against numpy brute force, with the tuned parameters.
    _, found = open_index(tmp_path / "idx").search(xq, 10)
    assert recall_at(found, brute_force(xq, x, 10), 10) >= 0.9
    assert idx.ntotal == 4000  # the held-out queries went back in


def test_flat_index_is_exact(tmp_path):
    x, _ = clusters(500)
    idx = build_index_from_array(x, tmp_path / "idx")
    assert idx.key == "IDMap2,Flat" and idx.meta["tuning"]["recall_at_10"] == 1.0
    xq, _ = clusters(20, seed=3)
    scores, ids = idx.search(xq, 5)
    np.testing.assert_array_equal(ids, brute_force(xq, x, 5))
    np.testing.assert_allclose(scores[:, 0], (l2_normalize(xq) @ x.T).max(axis=1), atol=1e-5)
    # exact search over the stored shards agrees, on the CPU with numpy and through torch
    d2, i2 = idx.exact_search(xq, 5)
    np.testing.assert_array_equal(i2, ids)
    pytest.importorskip("torch")
    dt, it = neighbors._torch_search(x, 5, "cpu")(l2_normalize(xq), None)
    np.testing.assert_array_equal(it, ids)


def test_exact_knn_merges_shards_and_excludes(tmp_path):
    x, _ = clusters(1000)
    manifest = write_embeddings(tmp_path, "s", x, shard_rows=128)
    store = EmbeddingStore.open(tmp_path, [manifest])
    assert len(store.shards) == 8 and len(store) == 1000
    xq = x[:10]
    _, ids = exact_knn(xq, store, 5)
    np.testing.assert_array_equal(ids, brute_force(xq, x, 5))
    _, ids = exact_knn(xq, store, 5, exclude=np.arange(10))
    assert not np.isin(ids, np.arange(10)).any()
    _, ids = exact_knn(xq, x[:3], 5)
    assert (ids[:, 3:] == -1).all()


# -- add and remove ------------------------------------------------------------------------------------
def test_add_and_remove_flat(tmp_path):
    x, _ = clusters(300)
    files = [f"img/{i:04d}.png" for i in range(300)]
    build_index_from_array(x, tmp_path / "idx", files=files, labels=[i % 3 for i in range(300)],
                           classes=["a", "b", "c"])
    idx = open_index(tmp_path / "idx", writable=True)
    new, _ = clusters(5, seed=9)
    ids = idx.add(new, files=[f"new/{i}.png" for i in range(5)], labels=[1] * 5)
    assert ids.tolist() == [300, 301, 302, 303, 304]
    idx.commit()
    idx = open_index(tmp_path / "idx")
    assert idx.ntotal == 305
    _, found = idx.search(new, 1)
    assert found[:, 0].tolist() == ids.tolist()
    assert idx.item(302)["file"] == "new/2.png" and idx.item(302)["label_name"] == "b"

    idx = open_index(tmp_path / "idx", writable=True)
    gone, missing = idx.ids_of_files(["new/2.png", "img/0007.png", "nope.png"])
    assert sorted(gone.tolist()) == [7, 302] and missing == ["nope.png"]
    assert idx.remove(gone) == 2
    idx.commit()
    idx = open_index(tmp_path / "idx")
    assert idx.ntotal == 303 and 302 not in idx.ids and 7 not in idx.ids
    _, found = idx.search(new[2:3], 5)
    assert 302 not in found
    assert len(idx.store()) == 303  # removed rows are filtered out of exact search too
    assert len(list((tmp_path / "idx").glob("v0*"))) == 1  # older generations are gone


def test_add_and_remove_on_disk_ivf(tmp_path):
    x, _ = clusters(3000)
    idx = build_index_from_array(x[:2500], tmp_path / "idx", index="IVF32,Flat", on_disk=True, queries=200,
                                 shard_rows=700)
    assert idx.meta["index"]["ivfdata"] and idx.meta["tuning"]["target_met"]
    assert idx.info()["on_disk"]
    w = open_index(tmp_path / "idx", writable=True)
    w.add(x[2500:])
    assert w.remove(np.arange(0, 100)) == 100
    w.commit()
    idx = open_index(tmp_path / "idx")
    assert idx.ntotal == 2900
    rindex.set_search_params(idx.index, {"nprobe": 32})
    _, found = idx.search(x[2500:2600], 1)
    assert (found[:, 0] == np.arange(2500, 2600)).all()
    _, found = idx.search(x[:100], 3)
    assert not np.isin(found, np.arange(100)).any()


def test_hnsw_cannot_remove(tmp_path):
    x, _ = clusters(300)
    build_index_from_array(x, tmp_path / "idx", index="HNSW16,Flat", files=[f"{i}.png" for i in range(300)])
    with pytest.raises(IndexFileError, match="HNSW graph cannot remove"):
        rindex.remove_files(tmp_path / "idx", ["1.png"])
    idx = open_index(tmp_path / "idx", writable=True)
    idx.add(x[:2] * -1)  # adding works
    idx.commit()
    assert open_index(tmp_path / "idx").ntotal == 302


def test_remove_unknown_path_is_refused(tmp_path):
    x, _ = clusters(50)
    build_index_from_array(x, tmp_path / "idx", files=[f"{i}.png" for i in range(50)])
    with pytest.raises(IndexFileError, match="not in the index: x.png"):
        rindex.remove_files(tmp_path / "idx", ["x.png"])
    assert rindex.remove_files(tmp_path / "idx", ["x.png", "3.png"], missing_ok=True)["removed"] == 1


# -- integrity -----------------------------------------------------------------------------------------
def _index_file(path):
    return path / json.loads((path / "index.json").read_text())["index"]["file"]


def test_damaged_index_gives_clear_errors(tmp_path):
    x, _ = clusters(400)
    out = tmp_path / "idx"
    build_index_from_array(x, out, index="IVF8,Flat", queries=0, tune=False)
    file = _index_file(out)
    data = file.read_bytes()

    file.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(IndexFileError, match="damaged.*truncated"):
        open_index(out)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, other bytes
    file.write_bytes(bytes(flipped))
    with pytest.raises(IndexFileError, match="sha256"):
        open_index(out)

    # garbage that the sidecar believes in: FAISS itself refuses it
    file.write_bytes(b"\x00garbage" * 100)
    meta = json.loads((out / "index.json").read_text())
    meta["index"]["file_bytes"] = 800
    meta["index"]["file_sha256"] = None
    (out / "index.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="damaged or not a FAISS index"):
        open_index(out)

    (out / "index.json").write_text("{not json")
    with pytest.raises(IndexFileError, match="damaged"):
        open_index(out)
    with pytest.raises(IndexFileError, match="no index at"):
        open_index(tmp_path / "nothing")


def test_crash_while_committing_leaves_the_old_index(tmp_path, monkeypatch):
    x, _ = clusters(200)
    out = tmp_path / "idx"
    build_index_from_array(x, out, files=[f"{i}.png" for i in range(200)])
    idx = open_index(out, writable=True)
    idx.add(x[:3], files=["a.png", "b.png", "c.png"])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sidecar, "atomic_write_json", boom)
    with pytest.raises(OSError):
        idx.commit()
    monkeypatch.undo()
    again = open_index(out)
    assert again.ntotal == 200 and "a.png" not in again.files


def test_existing_index_needs_overwrite(tmp_path):
    x, _ = clusters(100)
    build_index_from_array(x, tmp_path / "idx")
    with pytest.raises(IndexFileError, match="--overwrite"):
        build_index_from_array(x, tmp_path / "idx")
    idx = build_index_from_array(x[:50], tmp_path / "idx", overwrite=True)
    assert idx.ntotal == 50 and idx.meta["generation"] == 2
    assert [p.name for p in (tmp_path / "idx").glob("v0*")] == ["v0002"]
    assert all(p.name.startswith("g0002") for p in (tmp_path / "idx" / "embeddings").iterdir())


@pytest.mark.parametrize("key", ["IDMap2,Flat", "HNSW16,Flat", "IVF8,SQ8"])
def test_memory_mapped_open_gives_the_same_results(tmp_path, key):
    x, _ = clusters(600)
    build_index_from_array(x, tmp_path / "idx", index=key, queries=0, tune=False)
    a = open_index(tmp_path / "idx", mmap=False).search(x[:20], 5)[1]
    b = open_index(tmp_path / "idx", mmap=True).search(x[:20], 5)[1]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(IndexFileError, match="read-only"):
        open_index(tmp_path / "idx", mmap=True).add(x[:1])


def test_gpu_asked_without_gpu_faiss_falls_back_to_the_cpu(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(faiss_index, "gpu_count", lambda: 0)
    x, _ = clusters(1000)
    with caplog.at_level("WARNING", logger="compress_edge"):
        idx = build_index_from_array(x, tmp_path / "idx", index="IVF8,Flat", gpu=True, queries=100)
    assert idx.ntotal == 1000 and idx.meta["tuning"]["exact_device"] == "cpu"
    assert "no GPU support" in caplog.text
    assert open_index(tmp_path / "idx", gpu=True).search(x[:2], 1)[1][:, 0].tolist() == [0, 1]


def test_spec_is_recorded_and_checked(tmp_path):
    x, _ = clusters(100)
    spec = ModelSpec(arch="mobilenet_v3_small", embed_dim=32, image_size=32)
    idx = build_index_from_array(x, tmp_path / "idx", spec=spec)
    assert RetrievalIndex.open(tmp_path / "idx").spec == spec
    other = spec.replace(image_size=64)
    with pytest.raises(SpecMismatchError, match="different model.*image_size"):
        idx.spec.check_compatible(other, what="the index")


# -- shards and extraction -------------------------------------------------------------------------------
class FakeEmbedder:
    """Deterministic embeddings of preprocessed images (their mean colour per channel, padded)."""

    name = "fake"

    def __init__(self, dim: int = 8, image_size: int = 16) -> None:
        self.spec = ModelSpec(arch="fake", embed_dim=dim, image_size=image_size, weights_sha256="fake-weights")
        self.calls = 0

    def embed(self, batch):
        self.calls += 1
        x = np.asarray(batch, dtype=np.float32)
        feats = x.mean(axis=(2, 3))
        out = np.zeros((len(x), self.spec.embed_dim), np.float32)
        out[:, :3] = feats
        out[:, 3] = 1.0
        return out


def test_shard_writer_and_store_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    w = ShardWriter(tmp_path, "p", 16, shard_rows=300)
    for i in range(0, 1000, 170):
        w.write(x[i : i + 170], np.arange(i, min(i + 170, 1000)))
    name = w.close()
    store = EmbeddingStore.open(tmp_path, [name], live=np.arange(0, 1000, 2))
    assert [s["rows"] for s in store.shards] == [300, 300, 300, 100]
    got, ids = store.to_array()
    np.testing.assert_array_equal(ids, np.arange(0, 1000, 2))
    np.testing.assert_array_equal(got, x[::2])
    np.testing.assert_array_equal(store.gather(np.array([998, 4])), x[[998, 4]])
    assert store.sample(50, rng).shape == (50, 16)
    with pytest.raises(IndexFileError, match="not in the stored"):
        store.gather(np.array([1]))


def test_extraction_split_across_ranks(tmp_path, make_images):
    from compress_edge.retrieval.shards import open_gallery

    make_images(tmp_path / "imgs", per_class=5)
    gallery = open_gallery([str(tmp_path / "imgs")])
    assert len(gallery) == 15 and gallery.classes == ["circle", "square", "stripes"]
    assert gallery.files[0] == "circle/circle_000.png" and gallery.labels[:6] == [0] * 5 + [1]
    emb = FakeEmbedder()
    names = [extract_embeddings(emb, gallery, tmp_path / "emb", prefix="g0001", batch_size=4, rank=r,
                                world_size=2, extra={"token": "t"}) for r in (1, 0)]
    assert sorted(names) == ["g0001-r0.manifest.json", "g0001-r1.manifest.json"]
    wait_for_manifests(tmp_path / "emb", names, "t", timeout=1)
    with pytest.raises(IndexFileError, match="other ranks"):
        wait_for_manifests(tmp_path / "emb", names, "other", timeout=0.1, poll=0.05)
    store = EmbeddingStore.open(tmp_path / "emb", sorted(names))
    x, ids = store.to_array()
    assert sorted(ids.tolist()) == list(range(15))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    single = extract_embeddings(emb, gallery, tmp_path / "one", prefix="g0001", batch_size=64)
    x1, ids1 = EmbeddingStore.open(tmp_path / "one", [single]).to_array()
    np.testing.assert_allclose(x1[np.argsort(ids1)], x[np.argsort(ids)], atol=1e-6)


def test_build_from_images_with_an_embedder(tmp_path, make_images):
    make_images(tmp_path / "imgs", per_class=4)
    emb = FakeEmbedder()
    idx = rindex.build_from_images(emb, [str(tmp_path / "imgs")], tmp_path / "idx", batch_size=5)
    assert idx.ntotal == 12 and idx.classes == ["circle", "square", "stripes"]
    assert idx.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert idx.meta["build"]["images"] == 12 and idx.meta["build"]["embed_seconds"] >= 0
    assert idx.meta["spec"]["arch"] == "fake"
    # adding refuses a model of another kind
    other = FakeEmbedder(dim=8, image_size=24)
    make_images(tmp_path / "more", classes=("circle", "square"), per_class=1, seed=5)
    with pytest.raises(SpecMismatchError):
        rindex.add_images(tmp_path / "idx", [str(tmp_path / "more")], model=other)
    result = rindex.add_images(tmp_path / "idx", [str(tmp_path / "more")], model=emb)
    assert result == {"added": 2, "skipped": 0, "ntotal": 14}
    again = open_index(tmp_path / "idx")
    assert again.labels[-2:].tolist() == [0, 1]
    assert again.files[-1].startswith("..") or again.files[-1].startswith("/")
    assert again.resolve(again.files[-1]) == again.files[-1]  # its folder is recorded as one the index shows


class StopsAfter(FakeEmbedder):
    """A FakeEmbedder interrupted (as by Ctrl-C) at its call number ``stop``, and counting the images it embeds."""

    def __init__(self, stop: int | None) -> None:
        super().__init__()
        self.stop, self.images = stop, 0

    def embed(self, batch):
        if self.stop is not None and self.calls + 1 >= self.stop:
            raise KeyboardInterrupt
        self.images += len(batch)
        return super().embed(batch)


def test_an_embedding_without_a_bar_logs_each_shard_with_the_time_left(tmp_path, make_images, caplog):
    import logging

    make_images(tmp_path / "imgs", per_class=8)  # 24 images: shards of 8
    with caplog.at_level(logging.INFO, logger="compress_edge.retrieval.shards"):
        rindex.build_from_images(FakeEmbedder(), [str(tmp_path / "imgs")], tmp_path / "idx", batch_size=4,
                                 shard_rows=8, workers=1)  # progress off
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("embedded ")]
    assert len(lines) == 2 and lines[0].startswith("embedded 8 of 24 images (shard 1 written); about "), lines
    assert lines[1].startswith("embedded 16 of 24 images (shard 2 written)"), lines


def test_an_interrupted_build_continues_after_the_shards_it_finished(tmp_path, make_images):
    from compress_edge.retrieval.shards import PARTIAL_SUFFIX

    make_images(tmp_path / "imgs", per_class=8)  # 24 images: shards of 8, batches of 4
    kw = dict(batch_size=4, shard_rows=8, workers=1)
    with pytest.raises(KeyboardInterrupt):
        rindex.build_from_images(StopsAfter(stop=6), [str(tmp_path / "imgs")], tmp_path / "idx", **kw)
    partial = json.loads((tmp_path / "idx" / "embeddings" / f"g0001-r0{PARTIAL_SUFFIX}").read_text())
    assert [sh["rows"] for sh in partial["shards"]] == [8, 8]  # the 4 images of batch 5 were in no shard yet
    again = StopsAfter(stop=None)
    idx = rindex.build_from_images(again, [str(tmp_path / "imgs")], tmp_path / "idx", **kw)
    assert again.images == 8 and idx.ntotal == 24  # only the last shard's images were embedded
    assert not list((tmp_path / "idx" / "embeddings").glob(f"*{PARTIAL_SUFFIX}"))
    straight = rindex.build_from_images(FakeEmbedder(), [str(tmp_path / "imgs")], tmp_path / "ref", **kw)
    got, want = (EmbeddingStore.open(i.path / "embeddings").to_array() for i in (idx, straight))
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], atol=0)
    # index add: the same, for the images it adds.
    make_images(tmp_path / "more", per_class=8, seed=4)
    with pytest.raises(KeyboardInterrupt):
        rindex.add_images(tmp_path / "idx", [str(tmp_path / "more")], model=StopsAfter(stop=6), batch_size=4,
                          workers=1, shard_rows=8)
    assert open_index(tmp_path / "idx").ntotal == 24  # nothing added yet
    adder = StopsAfter(stop=None)
    result = rindex.add_images(tmp_path / "idx", [str(tmp_path / "more")], model=adder, batch_size=4, workers=1,
                               shard_rows=8)
    assert result["added"] == 24 and adder.images == 8 and open_index(tmp_path / "idx").ntotal == 48
    # A damaged record is no record.
    for damaged in ("[1, 2]", '{"key": 3}', "{not json"):
        w = ShardWriter(tmp_path / "w", "p", 8, shard_rows=8, resume_key="k")
        (tmp_path / "w" / f"p{PARTIAL_SUFFIX}").write_text(damaged)
        assert ShardWriter(tmp_path / "w", "p", 8, shard_rows=8, resume_key="k").rows == 0 and w.rows == 0
    # Other images (or another model) under the same name: nothing is reused.
    with pytest.raises(KeyboardInterrupt):
        rindex.build_from_images(StopsAfter(stop=6), [str(tmp_path / "imgs")], tmp_path / "idx2", **kw)
    make_images(tmp_path / "imgs", per_class=8, seed=9)  # the same file names, new pixels
    fresh = StopsAfter(stop=None)
    rindex.build_from_images(fresh, [str(tmp_path / "imgs")], tmp_path / "idx2", **kw)
    assert fresh.images == 24


def test_gallery_object_is_plain(tmp_path):
    g = Gallery(files=["a"], labels=None, classes=[], root=None, load=lambda i: "a")
    assert len(g) == 1
