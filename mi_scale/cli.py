"""`mi-scale` command line: train | resume | prepare | export | generate | eval | report | bench | sweep | plan |
mi-check.

Every user error (bad config, missing file, bad checkpoint) prints one
`error: ...` line naming the field, value and fix, and exits with status 2
before any work starts. A run that fails for good (a worker failed and
cluster.max_failures is spent) prints one `error: ...` line with the cause
and the log file holding the trace, and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys

from mi_scale import console  # noqa: F401  (its clock starts with the command)
from mi_scale.errors import Interrupted, RunFailed, UserFixableError


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("config", nargs=None if config_required else "?",
                   help="YAML config (default: the embedded MNIST-1D MLP config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set mi.weight=0.1")


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launcher", choices=["ray", "local"], default="ray",
                   help="ray (default): embedded local Ray or --address; local: this process, "
                        "or one rank under torchrun/deepspeed when RANK is set")
    p.add_argument("--address", default=None,
                   help="existing Ray cluster: 'auto' or 'ray://host:10001' (default: embedded local Ray)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's, DeepSpeed's and torch's own output (default: in RUN_DIR/logs/)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mi-scale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model with the inter-layer MI regularizer")
    _add_config_args(p)
    _add_launch_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run dir's latest valid checkpoint")

    p = sub.add_parser("resume", help="continue a run from its latest valid checkpoint")
    p.add_argument("run_dir", help="runs/<name>: holds config.yaml and checkpoints/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override settings that may change on resume (train.steps, cluster.*, tracking.*)")
    _add_launch_args(p)

    p = sub.add_parser("prepare", help="tokenize the config's text once into a token file that training memory-maps")
    _add_config_args(p, config_required=True)
    p.add_argument("--num-proc", type=int, default=None,
                   help="tokenizing processes (default: data.num_proc, else 1 for small text, else the cores)")
    p.add_argument("--train-tokenizer", type=int, default=None, metavar="VOCAB",
                   help="first train a byte-level BPE of VOCAB ids on the train split and tokenize with it "
                        "(saved in Hugging Face format in the prepared directory's tokenizer/)")

    p = sub.add_parser("report", help="plots and report.md from one or more run dirs")
    p.add_argument("run_dirs", nargs="+", help="run dirs (or folders holding run dirs)")
    p.add_argument("--out", default="report", help="report folder (default: ./report)")
    p.add_argument("--target-accuracy", type=float, default=None,
                   help="accuracy threshold for steps-to-target (study default: 0.5)")
    p.add_argument("--target-ppl", type=float, default=None,
                   help="language-model eval perplexity threshold for steps-to-target (study default: 11)")

    p = sub.add_parser("sweep", help="run a grid (configs/paper/grid.yaml) as parallel Ray trials, then report")
    p.add_argument("grid", nargs="+", help="grid YAML(s) with base, seeds, arms (and cells); several share one queue")
    p.add_argument("--address", default=None, help="existing Ray cluster (default: embedded local Ray)")
    p.add_argument("--output-dir", default="runs/sweep", help="where the trial run dirs go")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own output (default: only the sweep's lines; each trial's in its train.log)")
    p.add_argument("--parallel", type=int, default=None, help="trials at once (default: CPU count)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every trial")

    p = sub.add_parser("bench", help="side-by-side measurements (ratios from one run)")
    p.add_argument("what", choices=["mi-overhead", "peak", "scale", "gpu", "startup", "data"],
                   help="mi-overhead: step time with MI / without; peak: this CPU's matmul FLOP/s "
                        "(cached for MFU); scale: a GPT ladder at ZeRO-2/3 on 2 ranks (tokens/s, MFU, "
                        "memory); gpu: bf16 GPT training and estimators on a CUDA GPU; startup: command to "
                        "first step, main job vs Ray's floor; data: prepare throughput vs the datasets.map floor, "
                        "batch fetch vs step, per-rank memory on small and large corpora")
    p.add_argument("--steps", type=int, default=20, help="mi-overhead: timed steps per configuration")
    p.add_argument("--ranks", default="1,2", help="mi-overhead: world sizes to measure, e.g. 1,2")
    p.add_argument("--cases", default=None, help="mi-overhead: comma-separated cases (default: mlp,gpt-5m,main)")
    p.add_argument("--sizes", default=None,
                   help="scale: comma-separated presets (default: gpt-1m,gpt-5m,gpt-125m,gpt-350m); "
                        "gpu: default gpt-350m,gpt-1.3b")
    p.add_argument("--seconds", type=float, default=2.0, help="peak: seconds of matmuls per row")
    p.add_argument("--repeats", type=int, default=2, help="startup: runs of each variant (alternated)")
    p.add_argument("--corpus-mb", type=float, default=300, help="data: MiB of real text for the prepare rows")
    p.add_argument("--bpe-mb", type=float, default=50, help="data: MiB of it for the (slower) BPE rows")
    p.add_argument("--train-mb", default="10,1024", help="data: corpus sizes (MiB) trained on, comma-separated")
    p.add_argument("--num-procs", default="1,2", help="data: tokenizing processes to compare, comma-separated")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json / bench_scale.json / bench_gpu.json / bench_startup.json")

    p = sub.add_parser("mi-check", help="every estimator on tasks with known MI: table + plot")
    p.add_argument("--out", default="runs/mi-check", help="folder for mi_check.json and mi_check.png")
    p.add_argument("--quick", action="store_true", help="fewer tasks (about a minute)")
    p.add_argument("-n", type=int, default=2048, help="samples per task")

    p = sub.add_parser("plan", help="predicted peak memory per rank before running: fits? what to change")
    _add_config_args(p)
    p.add_argument("--nodes", type=int, default=None, help="nodes of the target cluster (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="plan for GPUs: world size = nodes x gpus-per-node (default: cluster.num_workers)")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="memory per GPU (default: this GPU's, or 80)")
    p.add_argument("--host-memory-gb", type=float, default=None, help="host memory per node (default: this machine's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--measure", action="store_true",
                   help="also run the config here (CPU ranks under torchrun) and compare the measured peak")
    p = sub.add_parser("export", help="a run's checkpoint as a Hugging Face model dir (safetensors)")
    p.add_argument("run_dir", help="runs/<name>: holds config.yaml and checkpoints/")
    p.add_argument("--out", required=True, help="new directory to write (never overwritten)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="tensor dtype (default fp32)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    p = sub.add_parser("generate", help="sample text from an LM run or an exported dir")
    p.add_argument("path", metavar="RUN_DIR|DIR", help="a run dir (newest checkpoint) or a `mi-scale export` dir")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same text")

    p = sub.add_parser("eval", help="loss and perplexity of an LM run or an exported dir")
    p.add_argument("path", metavar="RUN_DIR|DIR", help="a run dir (newest checkpoint) or a `mi-scale export` dir")
    p.add_argument("--data", default=None, help="a local text file (default: the run's held-out split)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument("--batches", type=int, default=0, help="evaluate only the first N batches (0: all)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="--data window length (default: the run's data.seq_len or the model's context)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserFixableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from mi_scale import config

    if args.command == "plan":
        from mi_scale import plan
        return plan.run_cli(args)
    if args.command == "prepare":
        from mi_scale.data import prepare
        cfg = config.load(args.config, args.overrides)
        prepare.run_cli(cfg.data, num_proc=args.num_proc, train_tokenizer=args.train_tokenizer)
        return 0
    if args.command == "mi-check":
        from mi_scale import mi_check
        mi_check.run(args.out, quick=args.quick, n=args.n)
        return 0
    if args.command == "report":
        from mi_scale import report
        path = report.write_report(args.run_dirs, args.out, target_accuracy=args.target_accuracy,
                                   target_ppl=args.target_ppl)
        print(f"wrote {path}")
        return 0
    if args.command == "bench":
        from mi_scale import bench
        sizes = args.sizes.split(",") if args.sizes else None
        if args.what == "peak":
            bench.peak(seconds=args.seconds)
        elif args.what == "scale":
            bench.scale(out_dir=args.out, sizes=sizes)
        elif args.what == "data":
            from mi_scale import bench_data
            bench_data.run(out_dir=args.out, corpus_mb=args.corpus_mb, bpe_mb=args.bpe_mb,
                           train_mb=[float(x) for x in args.train_mb.split(",")],
                           num_procs=[int(x) for x in args.num_procs.split(",")])
        elif args.what == "startup":
            bench.startup(repeats=args.repeats, out_dir=args.out)
        elif args.what == "gpu":
            from mi_scale import gpu_check
            gpu_check.run(out_dir=args.out, sizes=sizes)
        else:
            bench.mi_overhead(steps=args.steps, ranks=[int(r) for r in args.ranks.split(",")], out_dir=args.out,
                              cases=args.cases.split(",") if args.cases else None)
        return 0
    if args.command == "export":
        from mi_scale import export
        export.export(args.run_dir, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size)
        return 0
    if args.command in ("generate", "eval"):
        from mi_scale import look
        return look.run_cli(args)
    if args.command == "train":
        cfg = config.load(args.config, args.overrides)  # validate before importing heavy deps
        from mi_scale import launcher
        return launcher.launch(cfg, launcher=args.launcher, address=args.address, resume=args.resume,
                               verbose=args.verbose)
    if args.command == "resume":
        from mi_scale import launcher
        return launcher.resume(args.run_dir, args.overrides, launcher=args.launcher, address=args.address,
                               verbose=args.verbose)
    if args.command == "sweep":
        from mi_scale import sweep
        return sweep.run_grid(args.grid, output_dir=args.output_dir, address=args.address,
                              parallel=args.parallel, overrides=args.overrides, verbose=args.verbose)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
