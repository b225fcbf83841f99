"""The serving embedding store: loads the embed job's format, refuses other versions and
inconsistent folders. ``write_version`` (also used by the other serve tests) writes a version's
embeddings exactly as train/embed.py does, from a tiny random-init model, without Ray Data."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embsum.embeddings import ITEMS_DIR, USERS_DIR, Manifest, embedding_table, version_dir, write_manifest, write_shard
from embsum.predictor import Predictor
from tests.conftest import assert_f32_close

N_ITEMS, N_USERS = 30, 8
TOPICS = ["football final", "stock market", "pasta recipe", "election night", "new phone", "mountain hike"]


def item_text(i: int) -> str:
    return f"{TOPICS[i % len(TOPICS)]} story {i} | {TOPICS[(i * 7) % len(TOPICS)].split()[0]}"


def history_of(u: int, n_items: int = N_ITEMS) -> list[str]:
    return [f"n{(u * 5 + j * 3) % n_items}" for j in range(2 + u % 5)]


@dataclass
class Written:
    path: Path
    item_ids: list[str]
    user_ids: list[str]


def write_version(root: Path, predictor: Predictor, version: str, *, model_name: str = "embsum",
                  n_items: int = N_ITEMS, n_users: int = N_USERS, fingerprint: str = "") -> Written:
    """ROOT/v<version>/{items,users}/ + manifest.json, encoded like train/embed.py's actors do."""
    tok = predictor.tok
    ids = [f"n{i}" for i in range(n_items)]
    texts = [item_text(i) for i in range(n_items)]
    token_ids = tok.encode_texts(texts)  # what prepare stores in items.parquet
    items = predictor.encode_item_tokens(token_ids)
    by_id = dict(zip(ids, token_ids, strict=True))
    users = [f"U{u}" for u in range(n_users)]
    histories = [history_of(u, n_items) for u in range(n_users)]
    sessions = tok.sessions_batch([[by_id[i] for i in h] for h in histories])  # (U, G, L)
    enc = predictor.encode_users(sessions)
    out = version_dir(root, version)
    (out / ITEMS_DIR).mkdir(parents=True)
    (out / USERS_DIR).mkdir(parents=True)
    write_shard(embedding_table({"item_id": ids, "text": texts, "cpe": items.cpe, "cpe_key": items.key}),
                str(out / ITEMS_DIR / "part-0.parquet"))
    write_shard(embedding_table({"user_id": users, "history": pa.array(histories, pa.list_(pa.string())),
                                 "upe": enc.upe, "summary": enc.summaries}), str(out / USERS_DIR / "part-0.parquet"))
    cfg = predictor.cfg
    write_manifest(out, Manifest(model_name=model_name, model_version=version, model_fingerprint=fingerprint,
                                 items=n_items, users=n_users, dtype="float32", user_codes=cfg.user_codes,
                                 content_codes=cfg.content_codes, d_model=predictor.model.d_model,
                                 created_at=time.time()))
    return Written(path=out, item_ids=ids, user_ids=users)


def tiny_predictor(tiny_cfg, tokenizer, seed: int) -> Predictor:
    from embsum.model import EmbSum

    model = EmbSum.from_config(tiny_cfg, tokenizer.sos_id, seed=seed)
    with torch.no_grad():  # heads off their init, so versions differ and scores spread
        for p in (model.user_poly.codes, model.content_poly.codes, model.item_gate.weight):
            p.add_(torch.randn_like(p) * 0.5)
    return Predictor(model.eval(), tokenizer, device="cpu")


@pytest.fixture(scope="module")
def predictor(tiny_cfg, tokenizer) -> Predictor:
    return tiny_predictor(tiny_cfg, tokenizer, seed=1)


@pytest.fixture(scope="module")
def written(tmp_path_factory, predictor) -> Written:
    return write_version(tmp_path_factory.mktemp("emb"), predictor, "3")


def _shapes(p: Predictor) -> tuple[int, int, int]:
    return p.cfg.user_codes, p.cfg.content_codes, p.model.d_model


def test_load_holds_contiguous_float32_matrices_and_indexes(written, predictor):
    from serve.store import EmbeddingStore

    store = EmbeddingStore.load(written.path.parent, model_name="embsum", model_version="3",
                                shapes=_shapes(predictor))
    m, n, d = _shapes(predictor)
    assert store.version == "3" and store.num_items == N_ITEMS and len(store.user_ids) == N_USERS
    assert store.cpe.shape == store.cpe_key.shape == (N_ITEMS, n, d) and store.upe.shape == (N_USERS, m, d)
    for a in (store.cpe, store.cpe_key, store.upe):
        assert a.dtype == np.float32 and a.flags["C_CONTIGUOUS"]
    assert store.item_ids[store.item_index["n7"]] == "n7" and store.item_texts[7] == item_text(7)
    assert store.histories[store.user_index["U3"]] == history_of(3)
    assert all(isinstance(s, str) for s in store.summaries)
    assert store.describe()["model_version"] == "3" and store.describe()["items"] == N_ITEMS
    # Same numbers as the offline encoder.
    emb = predictor.encode_item_texts([item_text(5)])
    assert_f32_close(store.cpe[5], emb.cpe[0], rtol=1e-4)  # encoded in another batch


def test_shards_store_floats_plain_and_strings_encoded(written):
    """write_shard: no dictionary, statistics or compression on the float tensor columns (slow, and
    no gain on floats); strings keep dictionary encoding and snappy."""
    meta = pq.ParquetFile(written.path / ITEMS_DIR / "part-0.parquet").metadata.row_group(0)
    chunks = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i) for i in range(meta.num_columns)}
    for name in ("cpe", "cpe_key"):
        c = chunks[name]
        assert c.compression == "UNCOMPRESSED" and c.statistics is None and "RLE_DICTIONARY" not in c.encodings
    for name in ("item_id", "text"):
        assert chunks[name].compression == "SNAPPY" and "RLE_DICTIONARY" in chunks[name].encodings
    users = pq.ParquetFile(written.path / USERS_DIR / "part-0.parquet").schema_arrow
    assert users.field("history").type == pa.list_(pa.string()) and users.field("summary").type == pa.string()


def test_refuses_another_version_or_model(written):
    from serve.store import EmbeddingStore

    with pytest.raises(ValueError, match="manifest.json is missing"):
        EmbeddingStore.load(written.path.parent, model_name="embsum", model_version="4")
    # A folder renamed to another version: its manifest still names v3.
    wrong = written.path.parent / "v9"
    wrong.symlink_to(written.path, target_is_directory=True)
    with pytest.raises(ValueError, match=r"made by embsum v3, but the model being served is embsum v9"):
        EmbeddingStore.load(written.path.parent, model_name="embsum", model_version="9")
    with pytest.raises(ValueError, match="made by embsum v3, but the model being served is other v3"):
        EmbeddingStore.load(written.path.parent, model_name="other", model_version="3")


def test_refuses_shape_and_count_mismatches(tmp_path, predictor, written):
    from serve.store import EmbeddingStore

    m, n, d = _shapes(predictor)
    with pytest.raises(ValueError, match=r"the model's is \(9, 3, 32\)"):
        EmbeddingStore.load(written.path.parent, model_name="embsum", model_version="3", shapes=(9, n, d))
    bad = write_version(tmp_path, predictor, "5", n_items=6, n_users=2)
    manifest = json.loads((bad.path / "manifest.json").read_text())
    (bad.path / "manifest.json").write_text(json.dumps({**manifest, "items": 7}))
    with pytest.raises(ValueError, match="6 items / 2 users on disk but the manifest says 7 / 2"):
        EmbeddingStore.load(tmp_path, model_name="embsum", model_version="5")


def make_bundle(root: Path, predictor: Predictor, version: str, **kw):
    """A serving bundle without a registry: the written embeddings + the predictor that made them."""
    from serve.bundle import Bundle
    from serve.store import EmbeddingStore

    write_version(root, predictor, version, **kw)
    store = EmbeddingStore.load(root, model_name="embsum", model_version=version, shapes=_shapes(predictor))
    return Bundle(model_name="embsum", version=version, aliases=("champion",), predictor=predictor, store=store,
                  loaded_at=time.time())
