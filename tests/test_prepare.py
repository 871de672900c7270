"""Prepared language-model data: the token file's bytes, windows, locking,
staleness, corruption, resume on prepared data and constant per-rank memory."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mi_scale import config as config_mod
from mi_scale.config import DataConfig
from mi_scale.data import DataError, ShardedBatches, build_data, prepare
from mi_scale.data.tokens import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
         "boxing matches near an old harbour and curious ravens watch").split()


def write_docs(path: Path, n: int, seed: int = 0, empty_every: int = 7) -> list[str]:
    """n jsonl rows of word salad, every `empty_every`-th row empty (skipped as no document)."""
    rng = np.random.default_rng(seed)
    docs = ["" if i % empty_every == 3 else " ".join(rng.choice(WORDS, size=rng.integers(5, 60)))
            for i in range(n)]
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return docs


def files_cfg(tmp_path: Path, path: Path, **kw) -> DataConfig:
    return DataConfig(name="files", path=str(path), prepared_dir=str(tmp_path / "prepared"), **kw)


def expected_stream(docs: list[str], tok) -> np.ndarray:
    """Today's definition: tokenizer.encode of each non-empty document, joined by the separator."""
    pieces = []
    for i, d in enumerate(d for d in docs if d):
        if i:
            pieces.append(np.asarray(tok.separator, dtype=np.int64))
        pieces.append(np.asarray(tok.encode(d), dtype=np.int64))
    return np.concatenate(pieces)


def held_out(docs: list[str], cfg: DataConfig) -> tuple[list[str], list[str]]:
    """Train and held-out documents, as prepare.py documents its split: ceil(fraction x
    non-empty documents), drawn by a permutation from data.split_seed."""
    nonempty = [d for d in docs if d]
    n_test = int(np.ceil(len(nonempty) * cfg.test_fraction))
    test_ids = set(np.random.default_rng(cfg.split_seed).permutation(len(nonempty))[:n_test].tolist())
    return ([d for i, d in enumerate(nonempty) if i not in test_ids],
            [d for i, d in enumerate(nonempty) if i in test_ids])


def read_split(prepared, split: str) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.fromfile(prepared.path / f"{split}.bin", dtype=prepared.dtype).astype(np.int64)
    starts = np.fromfile(prepared.path / f"{split}.idx", dtype=np.int64)
    return tokens, starts


def check_token_files(prepared, docs: list[str], cfg: DataConfig, tok) -> None:
    for split, split_docs in zip(("train", "test"), held_out(docs, cfg)):
        tokens, starts = read_split(prepared, split)
        assert np.array_equal(tokens, expected_stream(split_docs, tok)), split
        assert len(starts) == len(split_docs) + 1 and starts[-1] == len(tokens)
        first = np.asarray(tok.encode(split_docs[0]))
        assert np.array_equal(tokens[starts[0]:starts[0] + len(first)], first)
        last = np.asarray(tok.encode(split_docs[-1]))
        assert np.array_equal(tokens[starts[-2]:], last)  # the final separator is cut


# ----------------------------------------------------------------------------
# the token file


def test_byte_token_file_is_encoded_documents_joined_by_separator(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", 300)
    cfg = files_cfg(tmp_path, tmp_path / "docs.jsonl", test_fraction=0.2, split_seed=3)
    prepared = prepare.ensure_prepared(cfg)
    tok = load_tokenizer("byte")
    assert prepared.meta["dtype"] == "uint16" and prepared.meta["vocab_size"] == 256
    check_token_files(prepared, docs, cfg, tok)
    n_docs = sum(1 for d in docs if d)
    assert prepared.meta["splits"]["test"]["documents"] == int(np.ceil(n_docs * 0.2))


def test_trained_bpe_token_file_and_tokenizer_reuse(tmp_path, capsys):
    from transformers import AutoTokenizer

    docs = write_docs(tmp_path / "docs.jsonl", 400, seed=1)
    cfg = files_cfg(tmp_path, tmp_path / "docs.jsonl")
    prepared = prepare.ensure_prepared(cfg, train_tokenizer=300)
    tok_dir = prepared.path / "tokenizer"
    hf = AutoTokenizer.from_pretrained(tok_dir)
    assert len(hf) == 300 and hf.eos_token == "<|endoftext|>"
    tok = load_tokenizer(str(tok_dir))
    assert tok.separator.tolist() == [hf.eos_token_id]
    check_token_files(prepared, docs, cfg, tok)
    # pointing data.tokenizer at the saved tokenizer finds the same directory: no second prepare
    capsys.readouterr()
    cfg.tokenizer = str(tok_dir)
    assert prepare.ensure_prepared(cfg).path == prepared.path
    assert "tokenizing" not in capsys.readouterr().out


def test_tokenizer_with_more_than_65535_ids_writes_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="<eos>").save_pretrained(
        tmp_path / "tok")
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(60_000, 70_000, size=20)) for _ in range(30)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = files_cfg(tmp_path, tmp_path / "docs.jsonl", tokenizer=str(tmp_path / "tok"))
    prepared = prepare.ensure_prepared(cfg)
    assert prepared.meta["dtype"] == "uint32" and prepared.meta["vocab_size"] == 70_002
    tok = load_tokenizer(str(tmp_path / "tok"))
    check_token_files(prepared, docs, cfg, tok)
    assert read_split(prepared, "train")[0].max() > 65_535


def test_windows_equal_in_memory_chunking_of_the_same_stream(tmp_path):
    """The samples of the prepared path are today's non-overlapping chunks of seq_len+1."""
    docs = write_docs(tmp_path / "docs.jsonl", 200, seed=2)
    cfg = files_cfg(tmp_path, tmp_path / "docs.jsonl", seq_len=16)
    bundle = build_data(cfg, seed=0)
    train_docs, test_docs = held_out(docs, cfg)
    for split, split_docs in ((bundle.train, train_docs), (bundle.test, test_docs)):
        stream = expected_stream(split_docs, load_tokenizer("byte"))
        n = len(stream) // 17
        chunks = torch.from_numpy(stream[:n * 17].reshape(n, 17))  # the in-memory chunking
        assert len(split) == n
        rows = split[:]
        assert torch.equal(rows["x"], chunks[:, :-1]) and torch.equal(rows["y"], chunks[:, 1:])
    # and ShardedBatches serves them in its global order: rank r of W takes slice r of batch b
    ranks = [ShardedBatches(bundle.train, 4, r, 2, seed=5) for r in (0, 1)]
    single = ShardedBatches(bundle.train, 8, 0, 1, seed=5)
    for _ in range(3):
        both = [sb.next_batch()["x"] for sb in ranks]
        assert torch.equal(torch.cat(both), single.next_batch()["x"])


def test_bundled_text_is_held_out_by_paragraph(tmp_path):
    from mi_scale.data.sources import CORPUS_PATH

    cfg = DataConfig(name="text", seq_len=32, prepared_dir=str(tmp_path / "p"))
    prepared = prepare.ensure_prepared(cfg)
    paragraphs = [p for p in CORPUS_PATH.read_text(encoding="utf-8").split("\n\n") if p]
    check_token_files(prepared, paragraphs, cfg, load_tokenizer("byte"))


# ----------------------------------------------------------------------------
# building once, staleness, corruption


def _prepare_in_process(cfg_dict: dict, barrier, out: str) -> None:
    import contextlib
    import io

    lines = io.StringIO()
    barrier.wait()
    with contextlib.redirect_stdout(lines), contextlib.redirect_stderr(io.StringIO()):
        path = prepare.ensure_prepared(DataConfig(**cfg_dict), say=print).path
    Path(out).write_text(json.dumps({"path": str(path), "lines": lines.getvalue()}))


def test_two_processes_preparing_at_once_build_it_once(tmp_path):
    write_docs(tmp_path / "docs.jsonl", 20_000, seed=4)  # ~1.5 MB: long enough to overlap
    cfg = files_cfg(tmp_path, tmp_path / "docs.jsonl")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [str(tmp_path / f"out{i}.json") for i in range(2)]
    procs = [ctx.Process(target=_prepare_in_process, args=(vars(cfg), barrier, o)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads(Path(o).read_text()) for o in outs]
    assert results[0]["path"] == results[1]["path"]
    assert sum(r["lines"].count("data: tokenizing") for r in results) == 1  # built once
    root = tmp_path / "prepared"
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [Path(results[0]["path"]).name]
    assert not list(root.glob(".*partial*"))  # no half-built directory left


def test_changed_source_or_tokenizer_is_detected_and_rebuilt(tmp_path, capsys):
    docs = write_docs(tmp_path / "docs.jsonl", 100, seed=5)
    cfg = files_cfg(tmp_path, tmp_path / "docs.jsonl")
    first = prepare.ensure_prepared(cfg)
    with open(tmp_path / "docs.jsonl", "a") as f:  # the source changes
        f.write(json.dumps({"text": "a brand new document about ravens", "id": 100}) + "\n")
    capsys.readouterr()
    second = prepare.ensure_prepared(cfg)
    out = capsys.readouterr().out
    assert second.path != first.path
    assert f"not reusing {first.path} (source files changed (size or modification time))" in out
    check_token_files(second, docs + ["a brand new document about ravens"], cfg, load_tokenizer("byte"))

    prepare.ensure_prepared(cfg, train_tokenizer=280)  # another tokenizer of the same source
    assert "tokenizer changed" in capsys.readouterr().out


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "mi_scale.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_truncated_token_file_is_one_error_line_and_exit_2(tmp_path):
    write_docs(tmp_path / "docs.jsonl", 100, seed=6)
    sets = ["--set", "data.name=files", "--set", f"data.path={tmp_path / 'docs.jsonl'}",
            "--set", f"data.prepared_dir={tmp_path / 'prepared'}"]
    config_mod.save(config_mod.load(None), tmp_path / "c.yaml")
    r = _cli("prepare", str(tmp_path / "c.yaml"), *sets, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.split("data: ready: ")[1].split(" (")[0])
    size = (path / "train.bin").stat().st_size
    with open(path / "train.bin", "r+b") as f:
        f.truncate(size - 6)
    r = _cli("prepare", str(tmp_path / "c.yaml"), *sets, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: prepared data {path / 'train.bin'} has {size - 6} bytes, meta.json says {size} (truncated "
        f"or corrupt): delete {path} and run `mi-scale prepare` again (or `mi-scale train`, which prepares it)"]


def test_corrupt_token_ids_are_refused_when_read(tmp_path):
    write_docs(tmp_path / "docs.jsonl", 100, seed=7)
    cfg = files_cfg(tmp_path, tmp_path / "docs.jsonl", seq_len=8)
    bundle = build_data(cfg, seed=0)
    mm = np.memmap(bundle.train.path, dtype=np.uint16, mode="r+")
    mm[3] = 4000  # outside the byte tokenizer's 256 ids
    mm.flush()
    with pytest.raises(DataError, match=r"token id 4000 is outside the tokenizer's 256 ids, so the file "
                                        r"is corrupt"):
        bundle.train.take(torch.tensor([0]))


# ----------------------------------------------------------------------------
# training on prepared data: exact resume, constant memory


def lm_cfg(tmp_path: Path, *overrides: str, name: str) -> config_mod.Config:
    base = [f"run.output_dir={tmp_path}", f"run.name={name}", "model.kind=gpt", "model.preset=gpt-1m",
            "data.name=text", "data.seq_len=32", "data.batch_size=8", f"data.prepared_dir={tmp_path / 'prep'}",
            "mi.sketch_dim=4", "mi.weight=0.01", "train.steps=8", "train.checkpoint_every=4", "train.eval_every=8",
            "train.eval_batches=2", "train.log_every=4", "tracking.wandb=disabled", "tracking.heatmap_every=8"]
    return config_mod.load(None, base + list(overrides))


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_resume_on_prepared_data_is_bit_exact(tmp_path):
    from mi_scale.train.worker import InjectedFault, run_worker

    full = lm_cfg(tmp_path, name="full")
    run_worker(full)
    part = lm_cfg(tmp_path, "fault.fail_at_step=4", name="part")
    with pytest.raises(InjectedFault):
        run_worker(part)
    run_worker(part, resume=True)
    a, b = train_rows(full.run_dir()), train_rows(part.run_dir())
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit
    assert [r["data_batch"] for r in a] == [r["data_batch"] for r in b]


def _train(rank, world, cfg_dict, resume):
    from mi_scale.train.worker import run_worker
    run_worker(config_mod.from_dict(cfg_dict), resume=resume)


@pytest.mark.slow
def test_resume_on_prepared_data_at_another_world_size(tmp_path):
    """2 ranks, interrupted at step 4, resumed on 1 rank: the same windows in the same
    order as a 1-rank run from the start (the global batch of 16 is kept)."""
    from distributed_helpers import run_world

    common = ("deepspeed.zero_stage=2", "train.lr=0.01")
    ref = lm_cfg(tmp_path, *common, "data.batch_size=16", name="ref")
    run_world(1, _train, ref.to_dict(), False)
    part = lm_cfg(tmp_path, *common, "fault.fail_at_step=4", name="part")
    with pytest.raises(AssertionError, match="injected fault"):
        run_world(2, _train, part.to_dict(), False)
    run_world(1, _train, part.to_dict(), True)
    a, b = train_rows(ref.run_dir()), train_rows(part.run_dir())
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["data_batch"] for r in b] == [r["data_batch"] for r in a]
    for x, y in zip(a, b):  # 2-rank gradient averaging vs 1 rank: float tolerance
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x["step"], x["loss"], y["loss"])


def _peak_rss_mb(tmp_path: Path, corpus: Path, name: str) -> float:
    cfg = lm_cfg(tmp_path, "data.name=files", f"data.path={corpus}", "data.seq_len=64", "train.steps=3",
                 "train.checkpoint_every=100", "train.eval_every=3", "train.eval_batches=1", "train.log_every=1",
                 name=name)
    prepare.ensure_prepared(cfg.data)  # here, so that the training process only opens it
    config_mod.save(cfg, tmp_path / f"{name}.yaml")
    r = _cli("train", str(tmp_path / f"{name}.yaml"), "--launcher", "local", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return train_rows(cfg.run_dir())[-1]["peak_mem_mb"]  # the rank's ru_maxrss


@pytest.mark.slow
def test_rank_memory_does_not_grow_with_the_corpus(tmp_path):
    """A rank training on a 100 MB prepared corpus peaks within 100 MB of one on 1 MB
    (the in-memory path held ~50 bytes per token: 5 GB for this corpus)."""
    block = "".join(json.dumps({"text": d}) + "\n" for d in write_docs(tmp_path / "x.jsonl", 2000, seed=8))
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    small.write_text(block * (2**20 // len(block) + 1))
    with open(large, "w") as f:
        for _ in range(100 * 2**20 // len(block) + 1):
            f.write(block)
    small_mb, large_mb = _peak_rss_mb(tmp_path, small, "small"), _peak_rss_mb(tmp_path, large, "large")
    assert large.stat().st_size > 100 * 2**20
    assert abs(large_mb - small_mb) < 100, (small_mb, large_mb)


def test_plan_data_line_counts_sample_order_and_one_batch(tmp_path):
    from mi_scale import plan

    write_docs(tmp_path / "docs.jsonl", 300, seed=9)
    overrides = ["model.kind=gpt", "model.preset=gpt-1m", "data.name=files", f"data.path={tmp_path / 'docs.jsonl'}",
                 f"data.prepared_dir={tmp_path / 'prepared'}", "data.seq_len=16", "data.batch_size=4"]
    cfg = config_mod.load(None, overrides)
    facts = plan.model_facts(cfg)
    nbytes, note = plan.data_bytes(cfg, facts)
    assert nbytes == 4 * 17 * (2 + 8) + 2 * 4 * 16 * 8 and note.startswith("data: not prepared yet")
    prepared = prepare.ensure_prepared(cfg.data)
    nbytes, note = plan.data_bytes(cfg, facts)
    samples = prepared.tokens("train") // 17
    assert nbytes == 4 * samples + 4 * 17 * (2 + 8) + 2 * 4 * 16 * 8
    assert f"of tokens in {prepared.path}, read through the page cache" in note
    assert plan.plan(cfg, advise=False).phases["forward_backward"]["data"] == nbytes
