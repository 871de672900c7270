"""The built-in GPT <-> Hugging Face GPT-2 (transformers.GPT2LMHeadModel).

The built-in GPT is GPT-2's architecture (pre-LN, LayerNorm eps 1e-5, exact
GELU, learned positions, tied head, biases everywhere), so its weights map
one to one. GPT-2's linear layers are Conv1D, which stores (in, out): the
four projection weights are transposed. The head is tied to the token
embedding and exists once (transformer.wte.weight).

    to_gpt2_name("blocks.0.attn.qkv.weight") == ("transformer.h.0.attn.c_attn.weight", True)
    from_gpt2_name("transformer.h.0.attn.c_attn.weight") == ("blocks.0.attn.qkv.weight", True)

The bool says whether the tensor is transposed on the way.
"""

from __future__ import annotations

import re

from mi_scale.models.gpt import GPTConfig

# ours -> GPT-2, inside a block
_BLOCK = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
          "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
_TOP = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
        "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias"}
_CONV1D = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")
_GPT2_BLOCK_RE = re.compile(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)$")

# Buffers older GPT-2 checkpoints carry (the causal mask); not weights.
GPT2_IGNORED = re.compile(r"(^|\.)attn\.(masked_)?bias$")


def to_gpt2_name(name: str) -> tuple[str, bool]:
    if name in _TOP:
        return _TOP[name], False
    m = _BLOCK_RE.match(name)
    if not m or m.group(2) not in _BLOCK:
        raise KeyError(f"{name} has no GPT-2 counterpart")
    i, part, kind = m.groups()
    return f"transformer.h.{i}.{_BLOCK[part]}.{kind}", part in _CONV1D and kind == "weight"


def from_gpt2_name(name: str) -> tuple[str, bool] | None:
    """Our name for a GPT-2 tensor name, or None for a name with no counterpart."""
    top = {v: k for k, v in _TOP.items()}
    if name in top:
        return top[name], False
    m = _GPT2_BLOCK_RE.match(name)
    back = {v: k for k, v in _BLOCK.items()}
    if not m or m.group(2) not in back:
        return None
    i, part, kind = m.groups()
    ours = back[part]
    return f"blocks.{i}.{ours}.{kind}", ours in _CONV1D and kind == "weight"


def gpt2_config(cfg: GPTConfig, dtype: str = "float32"):
    """transformers.GPT2Config of the same shape."""
    import transformers

    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=None, activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, architectures=["GPT2LMHeadModel"], dtype=dtype)
