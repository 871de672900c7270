"""`mi-scale generate` and `mi-scale eval`: look at what an LM learned."""

from __future__ import annotations

from mi_scale.errors import UserError


def run_cli(args) -> int:
    from mi_scale.inference import evaluate, generate, load_lm, text_windows

    for name in ("max_new_tokens", "batch_size", "batches", "top_k", "seq_len"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name in ("batches", "top_k") else 1):
            raise UserError(f"--{name.replace('_', '-')}: invalid value {value}: use a number >= "
                            f"{0 if name in ('batches', 'top_k') else 1}")
    lm = load_lm(args.path)
    if args.command == "generate":
        ids = [int(i) for i in lm.tokenizer.encode(args.prompt)]
        new = generate(lm, ids, args.max_new_tokens, args.temperature, args.top_k, args.seed)
        print(args.prompt + lm.tokenizer.decode(new), flush=True)
        return 0
    if args.data:
        seq_len = args.seq_len or (lm.run_config.data.seq_len if lm.run_config else lm.max_len)
        x, y = text_windows(lm, args.data, seq_len)
        what = args.data
    elif lm.run_config is not None:
        from mi_scale.data import build_data

        test = build_data(lm.run_config.data, lm.run_config.run.seed).test
        x, y = test[:]["x"], test[:]["y"]
        what = "the run's held-out split"
    else:
        raise UserError(f"--data: invalid value None: {args.path} is an exported dir, which has no held-out "
                        f"split; pass --data FILE (a local text file)")
    if args.batches:
        x, y = x[:args.batches * args.batch_size], y[:args.batches * args.batch_size]
    r = evaluate(lm, x, y, args.batch_size)
    print(f"eval  {lm.source} on {what}: loss {r['loss']:.4f} | ppl {r['ppl']:.3f} | {r['tokens']} tokens",
          flush=True)
    return 0
