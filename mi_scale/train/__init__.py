"""Per-rank training worker: DeepSpeed engine, step loop, checkpoints, tracking.

    from mi_scale.train.worker import run_worker
    summary = run_worker(cfg, resume=False)   # under torchrun, deepspeed, Ray, or alone
"""
