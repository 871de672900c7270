"""`mi-scale export`: a ZeRO-3, 2-rank, MI-on run of the built-in GPT out as
GPT-2 safetensors that transformers loads, with the same logits as the
training model (loaded back by DeepSpeed itself); refusals for incomplete or
corrupt checkpoints leave --out untouched."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from distributed_helpers import run_world
from mi_scale import cli
from mi_scale import config as config_mod



def _cfg(tmp, *extra):
    return config_mod.load(None, [
        "model.kind=gpt", "model.preset=gpt-1m", "data.name=text", "data.seq_len=16", "data.batch_size=4",
        "mi.sketch_dim=4", "mi.tokens_per_sample=3", "mi.weight=0.5", "train.steps=3", "train.eval_batches=2",
        "train.eval_every=3", "train.checkpoint_every=3", "tracking.wandb=disabled", "deepspeed.zero_stage=3",
        f"run.output_dir={tmp}", "run.name=gpt-z3", *extra])


def _batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (3, 16), generator=g)


def _train_then_reload(rank, world, cfg_dict):
    """Train, then load the checkpoint back into a fresh engine with
    DeepSpeed's own loader and return the model's logits on a fixed batch."""
    from mi_scale.data import build_data
    from mi_scale.train import checkpoint
    from mi_scale.train.engine import build_engine
    from mi_scale.train.worker import build_objective, run_worker, seed_everything

    cfg = config_mod.from_dict(cfg_dict)
    summary = run_worker(cfg)
    seed_everything(cfg.run.seed + 1)  # other weights than the checkpoint's until it loads
    objective, conf = build_objective(cfg, build_data(cfg.data, cfg.run.seed), world)
    engine = build_engine(cfg, objective, conf)
    meta, _ = checkpoint.load_latest(engine, cfg.run_dir(), world, cfg.training_keys())
    engine.module.eval()
    with torch.no_grad():
        logits = engine.module.model(_batch())
    return {"summary": summary, "step": meta["step"], "logits": logits}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = _cfg(tmp)
    res = run_world(2, _train_then_reload, cfg.to_dict())[0]
    assert res["step"] == 3
    return cfg.run_dir(), res


def _export(run_dir, out, *extra, capsys=None):
    code = cli.main(["export", str(run_dir), "--out", str(out), *extra])
    return code, (capsys.readouterr() if capsys else None)


@pytest.mark.slow  # real gloo ranks
def test_export_loads_in_transformers_with_the_training_logits(trained, tmp_path, capsys):
    import transformers

    run_dir, res = trained
    out = tmp_path / "gpt2"
    code, cap = _export(run_dir, out, "--max-shard-size", "1MB", capsys=capsys)
    assert code == 0, cap.err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 4 and files[-1] == "model-00004-of-00004.safetensors"  # 3.3 MB in 1 MB shards
    assert "lm_head.weight" not in index["weight_map"]  # the tied head is written once
    assert len(index["weight_map"]) == 4 * 12 + 4
    assert index["metadata"]["total_size"] == sum((out / f).stat().st_size for f in files) - sum(
        8 + int.from_bytes((out / f).read_bytes()[:8], "little") for f in files)  # bytes minus headers
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        logits = model(_batch()).logits
    torch.testing.assert_close(logits, res["logits"], rtol=0, atol=1e-5)
    manifest = json.loads((out / "mi_scale_export.json").read_text())
    assert (manifest["step"], manifest["world_size"], manifest["zero_stage"], manifest["tokenizer"]) == (3, 2, 3, "byte")
    assert not list(tmp_path.glob(".partial-*"))

    # bf16: half the bytes; logits within 2% of their range (bf16 keeps 8 bits of mantissa)
    code, cap = _export(run_dir, tmp_path / "bf16", "--dtype", "bf16", capsys=capsys)
    assert code == 0, cap.err
    model16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    with torch.no_grad():
        err = (model16(_batch()).logits - res["logits"]).abs().max()
    assert 0 < err < 0.02 * res["logits"].abs().max()


@pytest.mark.slow  # real gloo ranks
def test_missing_rank_file_is_one_error_line_and_out_untouched(trained, tmp_path, capsys):
    run_dir, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    ckpt = broken / "checkpoints" / "step-00000003"
    (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    out = tmp_path / "out"
    code, cap = _export(broken, out, capsys=capsys)
    assert code == 2
    assert cap.err.strip().splitlines() == [
        f"error: checkpoint file {ckpt / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'} is missing (1 of the files "
        f"that 2 ranks wrote at ZeRO-3 are): the checkpoint is incomplete; export another step (--step) or copy "
        f"the missing files from the host that wrote them"]
    assert not out.exists() and not list(tmp_path.glob(".partial-*"))


@pytest.mark.slow  # real gloo ranks
def test_corrupt_file_is_one_error_line_and_out_untouched(trained, tmp_path, capsys):
    run_dir, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    bad = broken / "checkpoints" / "step-00000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    bad.write_bytes(bad.read_bytes()[:-100])  # truncated: the zip directory at the end is gone
    out = tmp_path / "out"
    code, cap = _export(broken, out, capsys=capsys)
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint file {bad} is corrupt or unreadable (")
    assert lines[0].endswith("): export another step (--step), or restore the file")
    assert not out.exists() and not list(tmp_path.glob(".partial-*"))
    # an existing, non-empty --out is never overwritten
    out.mkdir()
    (out / "keep").write_text("x")
    code, cap = _export(run_dir, out, capsys=capsys)
    assert code == 2 and (out / "keep").read_text() == "x" and "export never overwrites" in cap.err


# -- model.init_from for the built-in GPT ------------------------------------------


def _init_run(rank, world, cfg_dict):
    from mi_scale.train.worker import run_worker

    cfg = config_mod.from_dict(cfg_dict)
    run_worker(cfg)
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    return rows


@pytest.mark.slow  # real gloo ranks
def test_init_from_export_and_run_dir_start_at_the_runs_final_eval_loss(trained, tmp_path, capfd):
    run_dir, res = trained
    out = tmp_path / "gpt2"
    assert _export(run_dir, out, capsys=capfd)[0] == 0
    final_eval = res["summary"]["eval_loss"]
    checksums = []
    for source in (out, run_dir):
        # one rank with the global batch of the 2-rank run: the same held-out samples
        cfg = _cfg(tmp_path, "train.steps=1", "data.batch_size=8", "deepspeed.zero_stage=2",
                   f"model.init_from={source}", f"run.name=from-{source.name}")
        capfd.readouterr()
        rows = run_world(1, _init_run, cfg.to_dict())[0]
        assert rows[0]["step"] == 0 and rows[0]["split"] == "eval"
        assert rows[0]["eval_loss"] == pytest.approx(final_eval, rel=1e-6)
        line = [x for x in capfd.readouterr().out.splitlines() if x.startswith("[mi-scale] init_from ")]  # the ranks' stdout
        assert len(line) == 1 and " 52 tensors, 0.83M values " in line[0], line
        checksums.append(line[0].split("sha256 ")[1])
    assert checksums[0] == checksums[1]  # the same weights, from GPT-2 safetensors and from the checkpoint
    assert cfg.training_keys()["model.init_from"] == str(run_dir)  # a resume must name the same weights


def test_init_from_refuses_missing_unexpected_and_misshapen_tensors(tmp_path):
    import transformers
    from safetensors.torch import load_file, save_file

    from mi_scale.models import GPT, GPTConfig, ModelError, build_gpt
    from mi_scale.train import init_from

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_positions=16, n_embd=32, n_layer=2,
                                                               n_head=2, bos_token_id=None, eos_token_id=None))
    hf.save_pretrained(tmp_path / "ok")
    model = build_gpt("gpt-1m", vocab_size=256, seq_len=16)  # width 128: every 2-D weight misfits
    weights = load_file(tmp_path / "ok" / "model.safetensors")
    with pytest.raises(ModelError) as e:
        init_from.load(model, "gpt", str(tmp_path / "ok"))
    msg = str(e.value)
    assert msg.startswith(f"model.init_from: invalid value '{tmp_path / 'ok'}': its weights do not fit this model: "
                          f"missing 24 (blocks.2.ln_1.weight; ")  # gpt-1m has 4 blocks, the file 2
    assert ", shape mismatch 28 (blocks.0.attn.qkv.bias (96,) in the file, (384,) in the model; " in msg

    ours = GPT(GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=32))  # the file's shape
    report = init_from.load(ours, "gpt", str(tmp_path / "ok"))
    assert report["tensors"] == 2 * 12 + 4
    torch.testing.assert_close(ours.blocks[1].mlp.fc.weight, weights["transformer.h.1.mlp.c_fc.weight"].t())
    bad = dict(weights)
    bad.pop("transformer.h.1.mlp.c_fc.bias")
    bad["transformer.h.1.attn.c_proj.weight"] = torch.zeros(32, 33)
    bad["transformer.extra.weight"] = torch.zeros(2)
    (tmp_path / "bad").mkdir()
    save_file(bad, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ModelError) as e:
        init_from.load(ours, "gpt", str(tmp_path / "bad"))
    assert str(e.value) == (
        f"model.init_from: invalid value '{tmp_path / 'bad'}': its weights do not fit this model: missing 1 "
        f"(blocks.1.mlp.fc.bias), unexpected 1 (transformer.extra.weight), shape mismatch 1 (blocks.1.attn.proj.weight "
        f"(33, 32) in the file, (32, 32) in the model); point init_from at weights of this architecture and shape "
        f"(model.preset or model.hf_name_or_path, data.seq_len, data.tokenizer)")


# -- generate and eval ------------------------------------------------------------


@pytest.mark.slow  # real gloo ranks
def test_generate_greedy_equals_transformers_and_sampling_is_seeded(trained, tmp_path, capsys):
    import transformers

    run_dir, res = trained
    out = tmp_path / "gpt2"
    assert _export(run_dir, out, capsys=capsys)[0] == 0
    prompt = "def "

    def gen(path, *extra):
        code = cli.main(["generate", str(path), "--prompt", prompt, "--max-new-tokens", "12", *extra])
        text = capsys.readouterr().out
        assert code == 0 and text.endswith("\n")
        return text[:-1]

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([list(prompt.encode())])
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    expected = bytes(ref[0].tolist()).decode("utf-8", errors="replace")
    assert gen(run_dir, "--temperature", "0") == expected  # our GPT from the checkpoint
    assert gen(out, "--temperature", "0") == expected  # the export through transformers
    sampled = gen(out, "--seed", "3", "--top-k", "20")
    assert gen(run_dir, "--seed", "3", "--top-k", "20") == sampled  # same seed, same text, either source
    assert gen(out, "--seed", "4", "--top-k", "20") != sampled

    # eval: the run's own held-out batches give the run's final eval loss
    assert cli.main(["eval", str(run_dir), "--batch-size", "8", "--batches", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("eval  ") and f" on the run's held-out split: loss {res['summary']['eval_loss']:.4f} | " in line
    assert line.endswith(" | 256 tokens")  # 2 batches x 8 windows x 16 tokens
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    losses = []
    for path in (run_dir, out):
        assert cli.main(["eval", str(path), "--data", str(text)]) == 0
        line = capsys.readouterr().out.strip()
        assert line.endswith(" | 336 tokens")  # 360 bytes: 21 windows of 16 + 1
        losses.append(line.split(": loss ")[1])
    assert losses[0] == losses[1]  # our GPT on the checkpoint, transformers on the export
    assert cli.main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.startswith(f"error: RUN_DIR|DIR: invalid value '{tmp_path}': neither")


# -- tracking.log_model ---------------------------------------------------------------


@pytest.mark.slow  # real gloo ranks
def test_log_model_exports_the_final_checkpoint_as_a_wandb_reference_artifact(tmp_path):
    from wandb_reader import artifacts

    cfg = _cfg(tmp_path, "train.steps=1", "deepspeed.zero_stage=2", "tracking.wandb=offline",
               "tracking.log_model=true", "run.name=logged")
    run_world(1, _init_run, cfg.to_dict())
    out = cfg.run_dir() / "export" / "step-00000001"
    files = sorted(p.name for p in out.iterdir())
    assert "model-00001-of-00001.safetensors" in files and "config.json" in files
    [run_file] = (cfg.run_dir() / "wandb").glob("offline-run-*/run-*.wandb")
    [art] = artifacts(run_file)
    assert (art.type, art.name, sorted(art.aliases)) == ("model", "logged-model", ["latest", "step-00000001"])
    entries = {e.path: e for e in art.manifest.contents}
    assert sorted(entries) == files  # a reference to every exported file, nothing copied
    safetensors = entries["model-00001-of-00001.safetensors"]
    assert safetensors.ref == f"file://{(out / 'model-00001-of-00001.safetensors').resolve()}"
    assert safetensors.size == (out / "model-00001-of-00001.safetensors").stat().st_size
    assert json.loads(art.metadata)["sha256"] == json.loads((out / "mi_scale_export.json").read_text())["sha256"]


def test_log_model_needs_a_language_model_and_wandb():
    with pytest.raises(config_mod.ConfigError, match=r"^tracking.log_model: invalid value True: the artifact "
                                                     r"goes to wandb: set tracking.wandb=offline or online$"):
        config_mod.load(None, ["model.kind=gpt", "tracking.wandb=disabled", "tracking.log_model=true"])
    with pytest.raises(config_mod.ConfigError, match=r"^tracking.log_model: invalid value True: exported models"):
        config_mod.load(None, ["model.kind=mlp", "tracking.log_model=true"])


def _train(rank, world, cfg_dict):
    from mi_scale.train.worker import run_worker
    run_worker(config_mod.from_dict(cfg_dict))


@pytest.mark.slow  # real gloo ranks
@pytest.mark.parametrize("stage", [0, 2])
def test_export_of_zero0_and_zero2_checkpoints_equals_the_zero3_one(trained, tmp_path, capsys, stage):
    """The same training at another ZeRO stage: its checkpoint's layout differs
    (whole module / fp32 slices per rank), the exported weights agree."""
    from safetensors.torch import load_file

    run_dir, _ = trained
    cfg = _cfg(tmp_path, f"deepspeed.zero_stage={stage}", f"run.name=z{stage}")
    run_world(2, _train, cfg.to_dict())
    weights = []
    for i, src in enumerate((run_dir, cfg.run_dir())):
        assert _export(src, tmp_path / f"out{i}", capsys=capsys)[0] == 0
        weights.append({k: v for f in sorted((tmp_path / f"out{i}").glob("*.safetensors")) for k, v in load_file(f).items()})
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) == 52
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
