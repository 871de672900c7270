"""model.init_from for Hugging Face models (GPT-2 and Llama-style, random
weights saved here with save_pretrained): MI-regularized fine-tuning at
ZeRO-3 on 2 real ranks starts at the HF model's own loss, the partitioned
build never holds the whole model, and the export reloads in transformers
with the trained model's loss."""

from __future__ import annotations

import hashlib
import json
import resource
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distributed_helpers import run_world
from mi_scale import cli
from mi_scale import config as config_mod

transformers = pytest.importorskip("transformers")


def _hf_config(arch: str, width: int = 64, layers: int = 2, vocab: int = 256):
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=width, n_layer=layers, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=None, eos_token_id=None)
    return transformers.LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=2 * width,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=32, tie_word_embeddings=False,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _save(arch, path, shard="60KB", **kw):  # save_pretrained's own sharding
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch, **kw))
    model.save_pretrained(path, max_shard_size=shard)
    return model.eval()


def _cfg(tmp, src, *extra):
    return config_mod.load(None, [
        "model.kind=hf", f"model.init_from={src}", "data.name=text", "data.seq_len=16", "data.batch_size=4",
        "mi.sketch_dim=4", "mi.tokens_per_sample=3", "mi.weight=0.5", "train.steps=2", "train.eval_batches=2",
        "train.eval_every=2", "train.checkpoint_every=2", "train.warmup_steps=0", "tracking.wandb=disabled",
        "deepspeed.zero_stage=3", f"run.output_dir={tmp}", "run.name=ft", *extra])


FIXED_NT = torch.arange(48).reshape(3, 16) * 5 % 256  # a batch valid in every vocabulary here


def _finetune(rank, world, cfg_dict):
    """Fine-tune; then load the checkpoint into a fresh engine with DeepSpeed's
    own loader and return the trained model's logits on a fixed batch."""
    from mi_scale.data import build_data
    from mi_scale.train import checkpoint
    from mi_scale.train.engine import build_engine
    from mi_scale.train.worker import build_objective, run_worker

    cfg = config_mod.from_dict(cfg_dict)
    run_worker(cfg)
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    objective, conf = build_objective(cfg, build_data(cfg.data, cfg.run.seed), world)  # init_from's weights
    engine = build_engine(cfg, objective, conf)
    checkpoint.load_latest(engine, cfg.run_dir(), world, cfg.training_keys())
    engine.module.eval()
    with torch.no_grad():
        logits = engine.module.model(FIXED_NT)
    return {"rows": rows, "logits": logits}


def _loss(model, x, y) -> float:
    with torch.no_grad():
        logits = model(x).logits
    return float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()))


@pytest.mark.slow  # real gloo ranks
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_finetune_from_hf_weights_at_zero3_then_export(arch, tmp_path):
    from mi_scale.data import ShardedBatches, build_data

    extra, vocab = [], 256
    if arch == "gpt2":  # with its own BPE tokenizer in the model dir, as a pretrained model comes
        from mi_scale.data.tokens import train_bpe
        corpus = (Path(__file__).parents[1] / "mi_scale/data/corpus/stdlib_docstrings.txt").read_text()
        train_bpe([[corpus[:20000]]], 300, tmp_path / "hf")
        extra, vocab = [f"data.tokenizer={tmp_path / 'hf'}"], 300
    hf = _save(arch, tmp_path / "hf", shard="60KB" if arch == "gpt2" else "10GB", vocab=vocab)  # sharded / one file
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == (arch == "gpt2")
    cfg = _cfg(tmp_path, tmp_path / "hf", *extra)
    res = run_world(2, _finetune, cfg.to_dict())[0]
    rows = res["rows"]
    bundle = build_data(cfg.data, cfg.run.seed)
    held_out = bundle.test[:16]  # the 2 evaluated global batches of 2 x 4, unshuffled
    first = [ShardedBatches(bundle.train, 4, r, 2, cfg.run.seed, True).next_batch() for r in range(2)]
    x, y = torch.cat([b["x"] for b in first]), torch.cat([b["y"] for b in first])

    init_eval, step1 = rows[0], rows[1]
    assert (init_eval["step"], init_eval["split"], step1["step"]) == (0, "eval", 1)
    assert init_eval["eval_loss"] == pytest.approx(_loss(hf, held_out["x"], held_out["y"]), rel=1e-6)
    assert step1["task_loss"] == pytest.approx(_loss(hf, x, y), rel=1e-6)  # the first step's batch, MI on
    assert step1["mi_loss"] != 0
    final = [r for r in rows if r["split"] == "eval"][-1]
    assert final["step"] == 2 and final["eval_loss"] != pytest.approx(init_eval["eval_loss"], rel=1e-4)

    assert cli.main(["export", str(cfg.run_dir()), "--out", str(tmp_path / "out")]) == 0
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(out) is type(hf)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
                                          .state_dict()) - ({"lm_head.weight"} if arch == "gpt2" else set())
    # the trained weights: transformers on the export gives the trained model's logits and final loss
    with torch.no_grad():
        torch.testing.assert_close(out(FIXED_NT).logits, res["logits"], rtol=0, atol=1e-5)
    assert _loss(out, held_out["x"], held_out["y"]) == pytest.approx(final["eval_loss"], rel=1e-6)
    if arch == "gpt2":  # the run's tokenizer travels with the export
        tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
        text = "Return the value of the named attribute."
        assert tok(text)["input_ids"] == transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"]
        assert len(tok(text)["input_ids"]) < len(text)  # BPE merges, not bytes


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _build_partitioned(rank, world, cfg_dict):
    from mi_scale.data import build_data
    from mi_scale.models import build_model
    from mi_scale.train.dist_env import init_process_group
    from mi_scale.train.worker import build_objective, seed_everything

    init_process_group()
    cfg = config_mod.from_dict(cfg_dict)
    bundle = build_data(cfg.data, cfg.run.seed)
    build_model(cfg.model, vocab_size=256, seq_len=16, device="meta")  # transformers' model code imported
    seed_everything(0)
    before, peak_before = _rss_bytes(), _peak_rss_bytes()
    objective, _ = build_objective(cfg, bundle, world)
    grown = max(_peak_rss_bytes() - max(before, peak_before), _rss_bytes() - before)
    held = sum(p.ds_tensor.numel() for p in objective.model.parameters()) * 4
    return {"growth": grown, "held": held, "sha256": objective.model.init_report["sha256"]}


@pytest.mark.slow  # real gloo ranks
def test_zero3_build_from_hf_weights_never_holds_the_whole_model(tmp_path):
    from safetensors.torch import load_file

    _save("gpt2", tmp_path / "hf", shard="20MB", width=768, layers=12)  # 85M parameters, 5 files
    files = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert len(files) >= 5
    full_bytes = sum(p.stat().st_size for p in files)
    digests = {}
    for f in files:  # the checksum init_from logs: per tensor, as loaded, sorted by name
        for name, t in load_file(f).items():
            digests[name] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()
    expected = hashlib.sha256("\n".join(f"{k} {digests[k]}" for k in sorted(digests)).encode()).hexdigest()
    cfg = _cfg(tmp_path, tmp_path / "hf")
    res = run_world(2, _build_partitioned, cfg.to_dict())
    assert res[0]["sha256"] == expected and res[1]["sha256"] is None  # rank 0 read every file, alone
    for r in res:
        assert r["held"] == pytest.approx(full_bytes / 2, rel=0.01)  # this rank's half
        assert r["growth"] < 0.6 * full_bytes, (r["growth"] / 2**20, full_bytes / 2**20)


class _Planted:
    """A pickle payload: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_init_from_pytorch_model_bin_is_weights_only(tmp_path):
    from mi_scale.models import ModelError, build_hf
    from mi_scale.train import init_from

    hf = _save("llama", tmp_path / "st")
    (tmp_path / "bin").mkdir()
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    reports = []
    for fmt in ("st", "bin"):
        model = build_hf(str(tmp_path / fmt))
        reports.append(init_from.load(model, "hf", str(tmp_path / fmt)))
        for name, p in model.named_parameters():
            assert torch.equal(p, hf.state_dict()[name]), name
    assert reports[0]["sha256"] == reports[1]["sha256"]  # the same weights from either format
    assert reports[0]["tensors"] == len(hf.state_dict())

    torch.save({"model.embed_tokens.weight": _Planted(tmp_path / "ran")}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ModelError) as e:
        init_from.load(build_hf(str(tmp_path / "bin")), "hf", str(tmp_path / "bin"))
    assert not (tmp_path / "ran").exists()
    assert str(e.value).startswith(f"model.init_from: invalid value '{tmp_path / 'bin'}': weight file "
                                   f"{tmp_path / 'bin' / 'pytorch_model.bin'} is corrupt, unsafe to unpickle or "
                                   f"unreadable (")
