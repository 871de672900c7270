"""Data layer: sources, splits, LM targets, sharded resumable batching, errors."""

from __future__ import annotations

import json
import random
import threading

import datasets
import numpy as np
import pytest
import torch

from mi_scale.config import DataConfig
from mi_scale.data import DataError, ShardedBatches, build_data
from mi_scale.data import hub
from mi_scale.data.sources import CORPUS_PATH


def xy(ds):
    """A torch-formatted split's (x, y) tensors."""
    cols = ds[:]
    return cols["x"], cols["y"]


def both(bundle):
    """(x, y) of train and test concatenated."""
    (xa, ya), (xb, yb) = xy(bundle.train), xy(bundle.test)
    return torch.cat([xa, xb]), torch.cat([ya, yb])


def lm_rows(bundle):
    """Each LM example as the token chunk it came from: x plus y's last token."""
    x, y = both(bundle)
    return sorted(bytes(torch.cat([xi, yi[-1:]]).tolist()) for xi, yi in zip(x, y))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_SCALE_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------
# sources


def test_mnist1d_standard_split_cached_and_rng_untouched(tmp_path):
    np.random.seed(123)
    random.seed(123)
    before = (np.random.get_state()[1].copy(), random.getstate())
    b = build_data(DataConfig(name="mnist1d"), seed=7)
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]

    assert (b.task, b.input_dim, b.num_classes, b.vocab_size) == ("classify", 40, 10, None)
    (x_train, y_train), (x_test, _) = xy(b.train), xy(b.test)
    assert x_train.shape == (4000, 40) and x_test.shape == (1000, 40)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    x, y = both(b)
    assert torch.bincount(y).tolist() == [500] * 10  # 5000 samples, 500 per class
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3  # package standardizes

    assert len(list((tmp_path / "cache").glob("mnist1d-*.npz"))) == 1
    again = build_data(DataConfig(name="mnist1d"), seed=0)  # from the cache; seed-independent
    assert all(torch.equal(u, v) for u, v in zip(both(again), both(b)))


def test_digits_split_sizes_scaling_and_seed():
    b = build_data(DataConfig(name="digits", test_fraction=0.1), seed=0)
    assert (len(b.train), len(b.test)) == (1617, 180)  # 1797 samples, ceil(179.7) held out
    assert (b.input_dim, b.num_classes) == (64, 10)
    x, _ = both(b)
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    from sklearn.datasets import load_digits
    assert x.double().sum().item() == pytest.approx(load_digits().data.sum() / 16)

    same = build_data(DataConfig(name="digits", test_fraction=0.1), seed=0)
    other = build_data(DataConfig(name="digits", test_fraction=0.1), seed=1)
    assert torch.equal(xy(same.test)[0], xy(b.test)[0])
    assert not torch.equal(xy(other.test)[0], xy(b.test)[0])
    assert len(build_data(DataConfig(name="digits", test_fraction=0.25), seed=0).test) == 450


def test_text_corpus_lm_targets_are_shifted_inputs():
    b = build_data(DataConfig(name="text", seq_len=32), seed=0)
    assert (b.task, b.vocab_size, b.seq_len, b.input_dim) == ("lm", 256, 32, None)
    raw = CORPUS_PATH.read_bytes()
    assert 300_000 <= len(raw) <= 600_000
    train_tokens = b.train.tokens.shape[0]
    test_tokens = b.test.tokens.shape[0]
    # whole paragraphs are held out (test_prepare.py checks which); both splits are 33-byte chunks
    assert len(b.train) == train_tokens // 33 and len(b.test) == test_tokens // 33
    assert 0.05 < test_tokens / (train_tokens + test_tokens) < 0.15
    for x, y in (xy(b.train), xy(b.test)):
        assert x.dtype == y.dtype == torch.int64 and x.shape[1] == y.shape[1] == 32
        assert torch.equal(y[:, :-1], x[:, 1:])
    # every example is corpus text (paragraphs joined by the blank-line separator)
    assert all(part in raw for row in lm_rows(b)[::50] for part in row.split(b"\n\n"))


def test_path_on_bundled_source_is_rejected():
    with pytest.raises(DataError, match=r"data\.path: 'x\.txt' is not used by data\.name=text"):
        build_data(DataConfig(name="text", path="x.txt"), seed=0)


# ----------------------------------------------------------------------------
# local files


def test_jsonl_text_file_is_byte_lm(tmp_path):
    docs = ["hello world, " * 20, "second document " * 15, "a third one here " * 12]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    b = build_data(DataConfig(name="files", path=str(path), text_field="body", seq_len=16,
                              test_fraction=0.2), seed=0)
    # ceil(0.2 x 3) = 1 whole document held out; the other two joined by a blank line
    held = next(d for d in docs if d.encode() == bytes(b.test.tokens.tolist()))
    stream = "\n\n".join(d for d in docs if d != held).encode()
    assert b.task == "lm" and len(b.train) == len(stream) // 17 and len(b.test) == len(held) // 17
    x, y = xy(b.train)
    assert [bytes(torch.cat([xi, yi[-1:]]).tolist()) for xi, yi in zip(x, y)] == [
        stream[i * 17:(i + 1) * 17] for i in range(len(stream) // 17)]


def test_csv_table_is_classification(tmp_path):
    path = tmp_path / "table.csv"
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 3)).round(4)
    labels = np.arange(50) % 4
    lines = ["a,b,name,label,c"] + [f"{f[0]},{f[1]},row{i},{labels[i]},{f[2]}"
                                     for i, f in enumerate(feats)]
    path.write_text("\n".join(lines) + "\n")
    b = build_data(DataConfig(name="files", path=str(path), test_fraction=0.2), seed=3)
    assert (b.task, b.input_dim, b.num_classes) == ("classify", 3, 4)  # 'name' is not numeric
    assert (len(b.train), len(b.test)) == (40, 10)
    x, y = (t.double().numpy() for t in both(b))
    order = np.lexsort(x.T[::-1])
    ref = np.lexsort(feats.T[::-1])
    np.testing.assert_allclose(x[order], feats[ref], atol=1e-6)
    assert np.array_equal(y[order], labels[ref])


def test_jsonl_string_labels_and_list_features(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"f": [i, i + 0.5], "g": i * 2, "label": ["cat", "dog", "ant"][i % 3]} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = build_data(DataConfig(name="files", path=str(path), test_fraction=0.1), seed=0)
    assert (b.input_dim, b.num_classes, len(b.train), len(b.test)) == (3, 3, 27, 3)
    by_g = {int(x[2]): (x.tolist(), int(y)) for x, y in zip(*both(b))}
    # classes are numbered in sorted order: ant 0, cat 1, dog 2
    assert by_g[8] == ([4.0, 4.5, 8.0], 2)  # row 4: dog
    assert by_g[10] == ([5.0, 5.5, 10.0], 0)  # row 5: ant


def test_hf_tokenizer_from_local_path(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "\n\n".join(["the cat sat on the mat . a dog ran to the cat ."] * 20)  # 20 paragraphs
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")
    fast.save_pretrained(tmp_path / "tok")
    (tmp_path / "a.txt").write_text(text)

    b = build_data(DataConfig(name="files", path=str(tmp_path / "a.txt"), seq_len=8,
                              tokenizer=str(tmp_path / "tok")), seed=0)
    ids = fast("the cat sat on the mat . a dog ran to the cat .", add_special_tokens=False)["input_ids"]
    assert b.vocab_size == len(fast) == 12  # 10 words + 2 specials
    # 18 train and 2 held-out paragraphs of 14 ids, joined by <eos>
    assert len(ids) == 14
    assert (b.train.tokens.shape[0], b.test.tokens.shape[0]) == (18 * 14 + 17, 2 * 14 + 1)
    assert len(b.train) == (18 * 14 + 17) // 9
    assert b.train.tokens[:15].tolist() == ids + [fast.eos_token_id]
    x, y = xy(b.train)
    assert torch.equal(y[:, :-1], x[:, 1:])


def test_missing_tokenizer_path_names_the_field():
    with pytest.raises(DataError, match=r"^data\.tokenizer: '/nonexistent/tok' is neither 'byte'"):
        build_data(DataConfig(name="text", tokenizer="/nonexistent/tok"), seed=0)


def test_missing_file_names_data_path(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError) as e:
        build_data(DataConfig(name="files", path=missing), seed=0)
    assert str(e.value).startswith(f"data.path: {missing!r} does not exist: point data.path at "
                                   f"an existing json/jsonl/csv/parquet/text file")


def test_unknown_suffix_and_missing_columns(tmp_path):
    odd = tmp_path / "data.xyz"
    odd.write_text("1,2\n")
    with pytest.raises(DataError, match=r"^data\.format: cannot infer the format .* '\.xyz'"):
        build_data(DataConfig(name="files", path=str(odd)), seed=0)
    plain = tmp_path / "t.jsonl"
    plain.write_text('{"a": 1}\n{"a": 2}\n')
    with pytest.raises(DataError, match=r"^data\.text_field='text' / data\.label_field='label': "
                                        r"neither column .* \(columns: \['a'\]\)"):
        build_data(DataConfig(name="files", path=str(plain)), seed=0)


# ----------------------------------------------------------------------------
# hub: fail fast offline


def _no_network(*args, **kwargs):
    raise AssertionError("went to the network")


def _clear_offline_env(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def test_hub_offline_env_fails_fast(monkeypatch):
    _clear_offline_env(monkeypatch)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(hub, "_reachable", _no_network)  # fast = never touches the network
    with pytest.raises(DataError) as e:
        build_data(DataConfig(name="hub", path="someone/no-such-dataset"), seed=0)
    msg = str(e.value)
    assert msg.startswith("data.path='someone/no-such-dataset': this Hugging Face Hub dataset "
                          "cannot be fetched offline (HF_DATASETS_OFFLINE=1")
    assert "data.name=files data.path=/path/to/train.jsonl" in msg


def test_hub_unreachable_fails_fast_with_cache_hint(monkeypatch):
    _clear_offline_env(monkeypatch)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_reachable", lambda host, port: False)
    monkeypatch.setattr(datasets, "load_dataset", _no_network)  # fast = no download attempt and retries
    with pytest.raises(DataError) as e:
        build_data(DataConfig(name="hub", path="someone/data:cfg"), seed=0)
    msg = str(e.value)
    assert "cannot be fetched offline (huggingface.co:443 is unreachable)" in msg
    assert "data.name=files" in msg and "set HF_DATASETS_OFFLINE=1" in msg


def test_probe_gives_up_within_its_deadline(monkeypatch):
    """No timing assert: the connect never answers, so False can only come from
    the probe's own deadline (a probe without one would hang here)."""
    called, release, seen = threading.Event(), threading.Event(), []

    def hang(address, timeout=None):  # a DNS lookup or connect that never answers
        seen.append(timeout)
        called.set()
        release.wait()
        raise OSError("timed out")

    monkeypatch.setattr(hub.socket, "create_connection", hang)
    try:
        assert hub._reachable("huggingface.co", 443, timeout=0.5) is False
    finally:
        release.set()
    called.wait()  # the probe thread may start late on a busy machine
    assert seen == [0.5]


# ----------------------------------------------------------------------------
# ShardedBatches

N = 103  # not a multiple of any batch size used below


@pytest.fixture
def toy():
    return datasets.Dataset.from_dict({"x": np.arange(N) * 10, "y": np.arange(N)})


def _take(batches, k):
    return [batches.next_batch() for _ in range(k)]


def test_order_follows_the_documented_permutation(toy):
    sb = ShardedBatches(toy, batch_size=4, rank=1, world_size=2, seed=5)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    # the order is held as int32 (half the memory): the same permutation torch draws as int64
    assert sb._order(0).dtype == torch.int32 and torch.equal(sb._order(0).long(), perm)
    big = 3_000_000
    assert torch.equal(torch.randperm(big, generator=torch.Generator().manual_seed(2), dtype=torch.int32).long(),
                       torch.randperm(big, generator=torch.Generator().manual_seed(2)))
    assert sb.batches_per_epoch == 12  # floor(103 / 8)
    assert torch.equal(sb.peek_indices(), perm[4:8])  # rank 1's slice of global batch 0
    batch = sb.next_batch()
    assert torch.equal(batch["y"], perm[4:8]) and torch.equal(batch["x"], perm[4:8] * 10)
    assert torch.equal(sb.next_batch()["y"], perm[12:16])


def test_two_ranks_concatenated_equal_one_rank_of_double_batch(toy):
    one = ShardedBatches(toy, batch_size=8, rank=0, world_size=1, seed=1)
    ranks = [ShardedBatches(toy, batch_size=4, rank=r, world_size=2, seed=1) for r in (0, 1)]
    for _ in range(30):  # crosses two epoch boundaries (12 batches per epoch)
        expected = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        for key in ("x", "y"):
            assert torch.equal(torch.cat([p[key] for p in parts]), expected[key])


def test_epoch_rollover_reshuffles(toy):
    sb = ShardedBatches(toy, batch_size=8, seed=0)
    epoch0 = torch.cat([b["y"] for b in _take(sb, 12)])
    assert sb.state_dict()["epoch"] == 1 and sb.state_dict()["batch_in_epoch"] == 0
    epoch1 = torch.cat([b["y"] for b in _take(sb, 12)])
    assert len(set(epoch0.tolist())) == 96 and len(set(epoch1.tolist())) == 96  # no repeats
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch1, torch.randperm(N, generator=torch.Generator().manual_seed(1))[:96])


def test_resume_mid_epoch_continues_identically(toy):
    ref = ShardedBatches(toy, batch_size=4, rank=1, world_size=2, seed=9)
    _take(ref, 7)
    sd = ref.state_dict()
    assert sd == {"epoch": 0, "batch_in_epoch": 7, "seed": 9, "world_size": 2, "batch_size": 4,
                  "num_samples": N}
    resumed = ShardedBatches(toy, batch_size=4, rank=1, world_size=2, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(sd)))  # survives a JSON round trip
    for _ in range(20):  # through the epoch boundary
        assert torch.equal(resumed.peek_indices(), ref.peek_indices())
        assert torch.equal(resumed.next_batch()["y"], ref.next_batch()["y"])


def test_resume_on_other_world_size_with_same_global_batch(toy):
    single = ShardedBatches(toy, batch_size=8, seed=2)
    _take(single, 5)
    sd = single.state_dict()
    ranks = [ShardedBatches(toy, batch_size=4, rank=r, world_size=2, seed=2) for r in (0, 1)]
    for r in ranks:
        r.load_state_dict(sd)
    for _ in range(10):
        assert torch.equal(torch.cat([r.next_batch()["y"] for r in ranks]), single.next_batch()["y"])


def test_mismatched_global_batch_raises(toy):
    sd = ShardedBatches(toy, batch_size=4, rank=0, world_size=2).state_dict()
    with pytest.raises(DataError) as e:
        ShardedBatches(toy, batch_size=3, rank=0, world_size=2).load_state_dict(sd)
    assert str(e.value) == (
        "data.batch_size: the checkpoint's data position was saved with a global batch of "
        "4 x 2 ranks = 8 samples, but this run uses 3 x 2 ranks = 6, so the saved position "
        "would point at different samples. Fix: keep data.batch_size x world size = 8 "
        "(e.g. data.batch_size=4 on 2 ranks), or start a new run")


def test_unshuffled_and_keep_last(toy):
    sb = ShardedBatches(toy, batch_size=4, rank=1, world_size=2, shuffle=False, drop_last=False)
    assert sb.batches_per_epoch == 13  # ceil(103 / 8)
    ys = [b["y"] for b in _take(sb, 13)]
    assert torch.equal(ys[0], torch.arange(4, 8))
    assert ys[-1].tolist() == [100, 101, 102]  # 7 left: rank 0 takes 96..99, rank 1 the rest
    assert torch.equal(sb.next_batch()["y"], torch.arange(4, 8))  # next epoch, same order


def test_global_batch_larger_than_dataset_is_a_data_error(toy):
    with pytest.raises(DataError, match=r"^data\.batch_size=64: a global batch of 128 samples"):
        ShardedBatches(toy, batch_size=64, world_size=2)


def test_batches_from_a_bundle_match_its_rows():
    b = build_data(DataConfig(name="text", seq_len=64), seed=0)
    sb = ShardedBatches(b.train, batch_size=32, seed=0)
    idx = sb.peek_indices()
    batch = sb.next_batch()
    assert batch["x"].shape == (32, 64) and batch["y"].dtype == torch.int64
    x, y = xy(b.train)
    assert torch.equal(batch["x"], x[idx]) and torch.equal(batch["y"], y[idx])
