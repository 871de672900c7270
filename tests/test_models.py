"""Models: shapes, hook order, residual maths, parameter counts, causality,
activation checkpointing, errors and the transformers wrapper.

Shape legend: N batch, I input features, W width, T tokens, D model width, V vocab.
"""

import copy
import fnmatch
import math

import pytest
import torch
import torch.nn.functional as F

from mi_scale.config import ModelConfig
from mi_scale.models import (PRESETS, DeepMLP, ModelError, build_gpt, build_model, count_params,
                             default_hook_patterns)


def hooked_names(model, pattern):
    """Modules a glob names, '*' not crossing a dot: 'blocks.*' -> blocks.0, blocks.1, ..."""
    return [n for n, _ in model.named_modules()
            if fnmatch.fnmatchcase(n, pattern) and n.count(".") == pattern.count(".")]


def record_outputs(model, pattern):
    """Attach forward hooks; returns the list that fills with (name, output) in call order."""
    seen = []
    for name in hooked_names(model, pattern):
        model.get_submodule(name).register_forward_hook(
            lambda mod, inp, out, name=name: seen.append((name, out)))
    return seen


# ---------------------------------------------------------------- MLP


def test_mlp_output_and_block_hooks_in_order():
    torch.manual_seed(0)
    cfg = ModelConfig(kind="mlp", depth=5, width=32, activation="tanh")
    model = build_model(cfg, input_dim=40, num_classes=10)
    assert default_hook_patterns(cfg) == ["blocks.*"]
    seen = record_outputs(model, "blocks.*")
    x_NI = torch.randn(7, 40)
    logits = model(x_NI)
    assert logits.shape == (7, 10)
    assert [n for n, _ in seen] == [f"blocks.{i}" for i in range(5)]
    assert all(h.shape == (7, 32) for _, h in seen)
    # each hooked output is the next block's input, and the last one feeds the head
    for (_, h_prev), (name, h_next) in zip(seen, seen[1:]):
        assert torch.equal(model.get_submodule(name)(h_prev), h_next)
    assert torch.equal(model.head(seen[-1][1]), logits)


@pytest.mark.parametrize("activation, act_fn", [("relu", F.relu), ("tanh", torch.tanh), ("gelu", F.gelu)])
def test_mlp_residual_block_is_x_plus_f_x(activation, act_fn):
    torch.manual_seed(0)
    model = DeepMLP(12, 3, depth=3, width=16, activation=activation, residual=True, norm="layernorm")
    block = model.blocks[1]
    with torch.no_grad():  # non-trivial LayerNorm affine so the norm is really exercised
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
    x_NW = torch.randn(9, 16)
    f_NW = act_fn(F.layer_norm(x_NW, (16,), block.norm.weight, block.norm.bias, 1e-5)
                  @ block.fc.weight.T + block.fc.bias)
    torch.testing.assert_close(block(x_NW), x_NW + f_NW, rtol=0, atol=1e-6)

    plain = DeepMLP(12, 3, depth=3, width=16, activation=activation)
    b = plain.blocks[0]
    torch.testing.assert_close(b(x_NW), act_fn(x_NW @ b.fc.weight.T + b.fc.bias), rtol=0, atol=1e-6)


def test_plain_deep_mlp_keeps_default_init_and_loses_the_input():
    """The plain deep stack is the hard testbed: PyTorch default init (uniform within
    1/sqrt(fan_in)), so the input-dependent part of the hidden state collapses with
    depth, while residual + LayerNorm keeps it."""
    torch.manual_seed(0)
    x_NI = torch.randn(256, 40)
    plain = DeepMLP(40, 10, depth=20, width=64, activation="tanh")
    bound = 1 / math.sqrt(64)
    for block in plain.blocks:
        assert block.fc.weight.abs().max() <= bound
        assert abs(block.fc.weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    easy = DeepMLP(40, 10, depth=20, width=64, activation="tanh", residual=True, norm="layernorm")
    spread = {}
    for name, model in (("plain", plain), ("easy", easy)):
        seen = record_outputs(model, "blocks.*")
        with torch.no_grad():
            model(x_NI)
        spread[name] = seen[-1][1].std(0).mean().item()  # std over samples, mean over features
    assert spread["plain"] < 1e-3
    assert spread["easy"] > 0.1


# ---------------------------------------------------------------- GPT


def gpt_params(n_layer: int, d: int, vocab: int, seq_len: int) -> int:
    """Counted by hand: per block 2 LayerNorms (2 x 2D), qkv (3D^2 + 3D), attention proj
    (D^2 + D), MLP fc (4D^2 + 4D) and proj (4D^2 + D); token and position embeddings
    (the lm head is tied) and ln_f (2D)."""
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return n_layer * block + vocab * d + seq_len * d + 2 * d


def test_small_gpt_param_counts():
    assert count_params(build_gpt("gpt-1m", vocab_size=256, seq_len=64)) == gpt_params(4, 128, 256, 64) == 834_304
    assert count_params(build_gpt("gpt-5m", vocab_size=256, seq_len=64)) == gpt_params(6, 256, 256, 64) == 4_820_992


@pytest.mark.parametrize("preset, expected", [
    ("gpt-125m", 124e6), ("gpt-350m", 355e6), ("gpt-1b", 1.11e9), ("gpt-1.3b", 1.3e9), ("gpt-7b", 6.7e9)])
def test_large_gpt_param_counts_on_meta(preset, expected):
    model = build_gpt(preset, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert PRESETS[preset].vocab_size == 50304
    assert abs(count_params(model) - expected) / expected < 0.10


def test_gpt_weight_tying_and_block_outputs():
    torch.manual_seed(0)
    model = build_gpt("gpt-1m", vocab_size=256, seq_len=16)
    x_ND = torch.randn(2, 128)
    assert torch.equal(model.lm_head(x_ND), x_ND @ model.tok_emb.weight.T)  # tied
    names = {n for n, _ in model.named_parameters()}
    assert "tok_emb.weight" in names and "lm_head.weight" not in names  # counted once
    seen = record_outputs(model, "blocks.*")
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    assert [n for n, _ in seen] == [f"blocks.{i}" for i in range(4)]
    assert all(h.shape == (3, 16, 128) for _, h in seen)
    # the last block's output is the residual stream that ln_f + lm_head read
    assert torch.equal(model.lm_head(model.ln_f(seen[-1][1])), logits)


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = build_gpt("gpt-1m", vocab_size=256, seq_len=32).eval()
    idx_NT = torch.randint(0, 256, (2, 32))
    t = 13
    changed = idx_NT.clone()
    changed[:, t] = (changed[:, t] + 1) % 256
    with torch.no_grad():
        a, b = model(idx_NT), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 0  # every later position sees it


def test_activation_checkpointing_same_logits_grads_and_block_outputs():
    torch.manual_seed(0)
    ref = build_gpt("gpt-1m", vocab_size=256, seq_len=32, dropout=0.1).train()
    ckpt = copy.deepcopy(ref)
    ckpt.activation_checkpointing = True
    idx_NT = torch.randint(0, 256, (4, 32))
    results = {}
    for name, model in (("ref", ref), ("ckpt", ckpt)):
        seen = record_outputs(model, "blocks.*")
        torch.manual_seed(1)  # same dropout masks in both
        logits = model(idx_NT)
        forward_outputs = [h.detach().clone() for _, h in seen]
        F.cross_entropy(logits.flatten(0, 1), idx_NT.flatten()).backward()
        results[name] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()},
                         forward_outputs)
    (l_ref, g_ref, h_ref), (l_ck, g_ck, h_ck) = results["ref"], results["ckpt"]
    assert torch.equal(l_ref, l_ck)
    assert len(h_ref) == len(h_ck) == 4  # one hook call per block in forward
    assert all(torch.equal(a, b) for a, b in zip(h_ref, h_ck))
    assert g_ref.keys() == g_ck.keys()
    for n in g_ref:
        torch.testing.assert_close(g_ck[n], g_ref[n], rtol=0, atol=1e-6)


def test_checkpoint_recompute_may_refire_block_hooks():
    """What a hook-based regularizer must tolerate: with torch's early stop off,
    the backward recompute calls each block's hooks again, with equal values
    (with early stop on, the default, it may stop before the block returns)."""
    torch.manual_seed(0)
    model = build_gpt("gpt-1m", vocab_size=256, seq_len=16).train()
    model.activation_checkpointing = True
    seen = record_outputs(model, "blocks.*")
    idx_NT = torch.randint(0, 256, (2, 16))
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        loss = model(idx_NT).square().mean()
        assert len(seen) == 4
        loss.backward()
    assert [n for n, _ in seen[4:]] == [f"blocks.{i}" for i in (3, 2, 1, 0)]  # backward order
    for (n1, h1), (n2, h2) in zip(seen[:4], reversed(seen[4:])):
        assert n1 == n2 and torch.equal(h1, h2)


def test_mlp_activation_checkpointing_same_grads():
    torch.manual_seed(0)
    ref = DeepMLP(40, 10, depth=4, width=32, residual=True, norm="layernorm", dropout=0.2)
    ckpt = copy.deepcopy(ref)
    ckpt.activation_checkpointing = True
    x_NI, y_N = torch.randn(8, 40), torch.randint(0, 10, (8,))
    grads, calls = [], []
    for model in (ref, ckpt):
        calls.append([])
        for i, block in enumerate(model.blocks):
            block.register_forward_pre_hook(lambda m, a, i=i, seen=calls[-1]: seen.append(i))
        torch.manual_seed(3)
        F.cross_entropy(model(x_NI), y_N).backward()
        grads.append([p.grad for p in model.parameters()])
    assert calls[0] == [0, 1, 2, 3]
    assert calls[1] == [0, 1, 2, 3, 3, 2, 1, 0]  # the recompute ran in backward, last block first
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- errors


def test_unknown_preset_error_message():
    with pytest.raises(ModelError) as e:
        build_model(ModelConfig(kind="gpt", preset="gpt-125"), vocab_size=256, seq_len=16)
    assert str(e.value) == (
        "model.preset: invalid value 'gpt-125': expected one of 'gpt-1m', 'gpt-5m', 'gpt-125m', "
        "'gpt-350m', 'gpt-1b', 'gpt-1.3b', 'gpt-7b' (did you mean 'gpt-125m'?)")
    assert isinstance(e.value, ValueError)


def test_missing_transformers_error_message(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ModelError) as e:
        build_model(ModelConfig(kind="hf", hf_name_or_path="gpt2"), vocab_size=256, seq_len=16)
    assert str(e.value) == ("model.hf_name_or_path: invalid value 'gpt2': model.kind=hf needs the "
                            "transformers package: pip install 'transformers>=4.40'")


# ---------------------------------------------------------------- transformers


@pytest.fixture
def tiny_gpt2_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64,
                            bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path)
    return str(tmp_path)


def test_hf_wrapper_names_logits_and_hook_pattern(tiny_gpt2_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(kind="hf", hf_name_or_path=tiny_gpt2_dir)
    model = build_model(cfg, vocab_size=256, seq_len=16).eval()
    assert default_hook_patterns(cfg) == ["transformer.h.*"]  # built on meta to inspect
    assert default_hook_patterns(cfg, model) == ["transformer.h.*"]
    assert set(model.state_dict()) == set(model.hf_model.state_dict())  # Hugging Face keys
    assert count_params(model) == count_params(model.hf_model)
    idx_NT = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model.hf_model(input_ids=idx_NT).logits
        seen = record_outputs(model, "transformer.h.*")
        logits = model(idx_NT)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 16, 256)
    assert torch.equal(logits, ref)
    assert [n for n, _ in seen] == ["transformer.h.0", "transformer.h.1"]
    assert all(h.shape == (2, 16, 32) for _, h in seen)


def test_hf_train_mode_and_activation_checkpointing(tiny_gpt2_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(kind="hf", hf_name_or_path=tiny_gpt2_dir)
    ref = build_model(cfg, vocab_size=256, seq_len=16).train()
    assert ref.hf_model.training and ref.transformer.h[0].training
    ckpt = copy.deepcopy(ref)
    ckpt.activation_checkpointing = True
    assert ckpt.activation_checkpointing and not ref.activation_checkpointing
    idx_NT = torch.randint(0, 256, (2, 16))
    grads = []
    for model in (ref, ckpt):
        torch.manual_seed(1)  # GPT2Config's default dropout 0.1 is on in train mode
        F.cross_entropy(model(idx_NT).flatten(0, 1), idx_NT.flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=1e-6)
    ckpt.activation_checkpointing = False
    assert not ckpt.activation_checkpointing
    ref.eval()
    assert not ref.hf_model.training


def test_hf_errors_name_the_field(tiny_gpt2_dir, tmp_path):
    with pytest.raises(ModelError, match=r"^model\.hf_name_or_path: invalid value .*config\.json"):
        build_model(ModelConfig(kind="hf", hf_name_or_path=str(tmp_path / "missing")))
    with pytest.raises(ModelError, match=r"^model\.hf_name_or_path: .*vocab_size 256 is smaller "
                                         r"than the tokenizer's 300"):
        build_model(ModelConfig(kind="hf", hf_name_or_path=tiny_gpt2_dir), vocab_size=300)
    with pytest.raises(ModelError, match=r"^data\.seq_len: invalid value 65: .*at most 64"):
        build_model(ModelConfig(kind="hf", hf_name_or_path=tiny_gpt2_dir), seq_len=65)
