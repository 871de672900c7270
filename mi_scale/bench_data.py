"""`mi-scale bench data`: the language-model data path at scale, side by side in one run.

1. prepare throughput (MB/s of text, tokens/s) for the byte tokenizer (on
   --corpus-mb) and a byte-level BPE (on --bpe-mb of the same text: it is
   ~20x slower), at each --num-procs, next to the library floor measured in
   the same run: a bare `datasets.map(batched=True, num_proc=N)` of the same
   tokenizer over the same loaded files (no separators, no token file). Each
   runs in its own process, alternating which goes first; prepare's peak is
   the whole process tree's anonymous RSS (mapped file pages are page cache).
2. fetching one batch of windows from the token file, against the model's
   step time (from the training runs of 3).
3. per-rank peak RSS and command-to-first-step of a 2-rank `mi-scale train`
   on prepared corpora of each --train-mb size (real text: the documentation
   strings of the installed packages, make_corpus.py).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MiB = 2**20


def _anon_mib(pid: int) -> float:
    """Anonymous resident memory of a process (RssAnon): what it really holds. Its RSS also
    counts the pages of memory-mapped files it reads (the Arrow cache, the token file),
    which are page cache the kernel reclaims at will."""
    with open(f"/proc/{pid}/status") as f:
        kib = [int(line.split()[1]) for line in f if line.startswith("RssAnon:")]
    return kib[0] / 1024 if kib else 0.0  # a process that is exiting has none


def _run_measured(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run cmd; return it and the peak anonymous RSS (MiB) of its whole process tree, sampled
    every 0.1 s."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                root = psutil.Process(proc.pid)
                peak[0] = max(peak[0], sum(_anon_mib(p.pid) for p in [root, *root.children(recursive=True)]))
            except (psutil.Error, OSError, StopIteration):
                pass
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    t.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak[0]


def _check(r: subprocess.CompletedProcess) -> None:
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(r.args[:6])} ... failed ({r.returncode}):\n{r.stderr[-3000:]}")


def floor(path: str, tokenizer: str, num_proc: int, cache_dir: str) -> None:
    """The library floor (run in its own process by `run`): load the files (cached
    Arrow), then time one bare datasets.map of the tokenizer; prints JSON."""
    import datasets

    from mi_scale.data.tokens import load_tokenizer

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=[path])["train"]
    tok = load_tokenizer(tokenizer)
    t0 = time.perf_counter()
    mapped = ds.map(lambda b: {"ids": tok.encode_batch(b["text"])}, batched=True, batch_size=1000,
                    num_proc=num_proc if num_proc > 1 else None, remove_columns=ds.column_names,
                    load_from_cache_file=False, cache_file_name=os.path.join(cache_dir, "floor.arrow"))
    seconds = time.perf_counter() - t0
    tokens = sum(len(ids) for batch in mapped.data.column("ids").chunks for ids in [batch.flatten()])
    print(json.dumps({"seconds": seconds, "tokens": tokens}))


def run(out_dir: str = "runs/bench", corpus_mb: float = 300, train_mb: list[float] | None = None,
        num_procs: list[int] | None = None, bpe_vocab: int = 8192, bpe_mb: float = 50) -> dict:
    from mi_scale import config as config_mod
    from mi_scale.data.make_corpus import write_jsonl

    train_mb = train_mb or [10, 1024]
    num_procs = num_procs or [1, 2]
    work = Path(out_dir).resolve() / "data"
    work.mkdir(parents=True, exist_ok=True)
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "MI_SCALE_CACHE": str(work / "cache"),
           "HF_DATASETS_CACHE": str(work / "hf-cache")}

    def corpus(mb: float) -> Path:
        path = work / f"real-{mb:g}mb.jsonl"
        if not path.exists():
            print(f"[bench data] writing {mb:g} MiB of real text to {path}", flush=True)
            write_jsonl(path.with_suffix(".partial"), int(mb * MiB))
            path.with_suffix(".partial").rename(path)
        return path

    def prepare_cmd(path: Path, prepared_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "mi_scale.cli", "prepare", str(config_path), "--set", "data.name=files",
                "--set", f"data.path={path}", "--set", f"data.prepared_dir={prepared_dir}", *extra]

    config_path = work / "lm.yaml"
    config_mod.save(config_mod.load(Path(__file__).parent.parent / "configs" / "tiny-gpt-text.yaml", []),
                    config_path)
    big, bpe_corpus = corpus(corpus_mb), corpus(min(bpe_mb, corpus_mb))  # a BPE is ~20x slower than bytes
    # the BPE: trained once on a sample of up to 20 MiB (as a user would: prepare --train-tokenizer)
    sample = corpus(min(20.0, corpus_mb))
    r, _ = _run_measured(prepare_cmd(sample, work / "bpe", "--train-tokenizer", str(bpe_vocab)), env)
    _check(r)
    bpe_dir = re.search(r"data\.tokenizer=(\S+)", r.stdout)[1]
    print(f"[bench data] BPE of {bpe_vocab} ids trained on {min(20.0, corpus_mb):g} MiB: {bpe_dir}", flush=True)
    for path in (big, bpe_corpus):  # the Arrow cache, for both sides
        _check(_run_measured([sys.executable, "-c", f"import datasets; datasets.load_dataset('json', "
                              f"data_files=[{str(path)!r}])"], env)[0])

    def prepare_once(path: Path, tok_name: str, tok: str, n: int) -> tuple[dict, float, float]:
        prepared_dir = work / f"prepared-{tok_name}-{n}"
        subprocess.run(["rm", "-rf", str(prepared_dir)], check=True)
        t0 = time.perf_counter()
        r, peak = _run_measured(prepare_cmd(path, prepared_dir, "--num-proc", str(n), "--set",
                                            f"data.tokenizer={tok}"), env)
        _check(r)
        wall = time.perf_counter() - t0
        meta = json.loads(next(prepared_dir.glob("files-*/meta.json")).read_text())
        subprocess.run(["rm", "-rf", str(prepared_dir)], check=True)
        return meta, peak, wall

    def floor_once(path: Path, tok: str, n: int) -> dict:
        fr, _ = _run_measured([sys.executable, "-c", f"from mi_scale.bench_data import floor; floor("
                               f"{str(path)!r}, {tok!r}, {n}, {str(work)!r})"], env)
        _check(fr)
        return json.loads(fr.stdout.strip().splitlines()[-1])

    rows = []
    for i, (tok_name, tok, path) in enumerate((("byte", "byte", big), (f"bpe-{bpe_vocab}", bpe_dir, bpe_corpus))):
        for j, n in enumerate(num_procs):
            if (i + j) % 2:  # alternate which side runs first, so that drift of a busy machine hits both
                fl = floor_once(path, tok, n)
                meta, peak, wall = prepare_once(path, tok_name, tok, n)
            else:
                meta, peak, wall = prepare_once(path, tok_name, tok, n)
                fl = floor_once(path, tok, n)
            for f in work.glob("floor*.arrow"):
                f.unlink()
            tokens = sum(s["tokens"] for s in meta["splits"].values())
            mb = meta["text_bytes"] / MiB
            row = {"tokenizer": tok_name, "num_proc": n, "text_mb": round(mb, 1), "tokens": tokens,
                   "prepare_s": meta["prepare_seconds"], "prepare_mb_s": mb / meta["prepare_seconds"],
                   "prepare_tokens_s": tokens / meta["prepare_seconds"], "prepare_wall_s": wall,
                   "prepare_peak_anon_mb": peak, "floor_s": fl["seconds"], "floor_mb_s": mb / fl["seconds"],
                   "ratio_to_floor": meta["prepare_seconds"] / fl["seconds"], "load_avg_1m": os.getloadavg()[0]}
            rows.append(row)
            print(f"[bench data] prepare {tok_name:<9} num_proc {n}: {row['prepare_mb_s']:6.1f} MB/s "
                  f"{row['prepare_tokens_s'] / 1e6:6.2f}M tokens/s, peak {peak:6.0f} MiB anon | floor "
                  f"{row['floor_mb_s']:6.1f} MB/s | prepare / floor {row['ratio_to_floor']:.2f} (load {row['load_avg_1m']:.1f})",
                  flush=True)

    train_rows = [_train(corpus(mb), mb, work, env) for mb in train_mb]
    fetch = _fetch_time(work, train_mb[-1], env)
    result = {"corpus_mb": corpus_mb, "prepare": rows, "train": train_rows, "fetch": fetch}
    step = statistics.median(r["step_time_s"] for r in train_rows)
    result["fetch"]["share_of_step"] = fetch["median_s"] / step
    print(f"[bench data] one batch from the token file: median {fetch['median_s'] * 1e3:.2f} ms, p99 "
          f"{fetch['p99_s'] * 1e3:.2f} ms = {100 * fetch['median_s'] / step:.2f}% of the median step "
          f"({step * 1e3:.0f} ms)")
    (Path(out_dir) / "bench_data.json").write_text(json.dumps(result, indent=1))
    print(f"[bench data] wrote {Path(out_dir) / 'bench_data.json'}")
    return result


def _lm_overrides(path: Path, work: Path, name: str) -> list[str]:
    return ["--set", "data.name=files", "--set", f"data.path={path}", "--set", f"data.prepared_dir={work / 'train'}",
            "--set", f"run.output_dir={work / 'runs'}", "--set", f"run.name={name}", "--set", "train.steps=30",
            "--set", "train.eval_every=30", "--set", "train.eval_batches=2", "--set", "train.checkpoint_every=1000",
            "--set", "train.log_every=10", "--set", "tracking.wandb=disabled"]


def _train(path: Path, mb: float, work: Path, env: dict) -> dict:
    """Prepare (timed, peak RSS), then a 2-rank `mi-scale train` of tiny-gpt-text on it."""
    name = f"train-{mb:g}mb"
    subprocess.run(["rm", "-rf", str(work / "runs" / name)], check=True)
    base = [sys.executable, "-m", "mi_scale.cli"]
    t0 = time.perf_counter()
    r, prep_peak = _run_measured(base + ["prepare", str(work / "lm.yaml"), *_lm_overrides(path, work, name)], env)
    _check(r)
    prep_s = time.perf_counter() - t0
    r, _ = _run_measured(base + ["train", str(work / "lm.yaml"), *_lm_overrides(path, work, name)], env)
    _check(r)
    first = float(re.search(r"first step\s+([\d.]+) s", r.stdout)[1])
    rows = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if x["split"] == "train"]
    row = {"corpus_mb": mb, "prepare_wall_s": prep_s, "prepare_peak_anon_mb": prep_peak, "first_step_s": first,
           "peak_rss_mb_rank0": train[-1]["peak_mem_mb"], "peak_rss_mb_max_rank": train[-1]["peak_mem_mb_max_rank"],
           "step_time_s": statistics.median(x["step_time_s"] for x in train[5:]), "load_avg_1m": os.getloadavg()[0]}
    print(f"[bench data] train on {mb:g} MiB: prepare {prep_s:.0f} s (peak {prep_peak:.0f} MiB anon), first step "
          f"at {first:.1f} s, per-rank peak RSS {row['peak_rss_mb_max_rank']:.0f} MiB (load {row['load_avg_1m']:.1f})",
          flush=True)
    return row


def _fetch_time(work: Path, mb: float, env: dict) -> dict:
    """Median and p99 time of ShardedBatches.next_batch on the largest prepared corpus (rank 0 of 2)."""
    from mi_scale import config as config_mod
    from mi_scale.data import ShardedBatches, build_data

    cfg = config_mod.load(work / "lm.yaml", ["data.name=files", f"data.path={work / f'real-{mb:g}mb.jsonl'}",
                                             f"data.prepared_dir={work / 'train'}"])
    bundle = build_data(cfg.data, cfg.run.seed, say=lambda line: None)
    batches = ShardedBatches(bundle.train, cfg.data.batch_size, 0, 2, seed=0)
    times = []
    for _ in range(500):
        t0 = time.perf_counter()
        batches.next_batch()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": statistics.median(times), "p99_s": times[int(0.99 * len(times))],
            "batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len}
