"""The model and the data of a config, from shapes alone: the model is built on
the meta device (no memory), the data's sizes read from its source or its
prepared tokens where that tells them."""

from __future__ import annotations

from dataclasses import dataclass

from mi_scale.config import Config
from mi_scale.plan.units import fmt_count


@dataclass
class ModelFacts:
    kind: str
    params: int
    largest_param: int
    param_sizes: list  # elements of each distinct parameter tensor
    n_layer: int  # blocks (gpt/hf) or hidden layers (mlp)
    width: int  # d_model or mlp width
    vocab: int  # gpt/hf vocab; mlp: classes
    seq_len: int  # tokens per sample (1 for mlp)
    input_dim: int  # mlp only
    hooked: list  # MI-hooked module names
    hooked_widths: list

    def describe(self) -> str:
        if self.kind == "mlp":
            return f"mlp: {fmt_count(self.params)} parameters, {self.n_layer} layers x width {self.width}"
        return (f"{self.kind}: {fmt_count(self.params)} parameters, {self.n_layer} blocks x d {self.width}, "
                f"vocab {self.vocab}, seq {self.seq_len}")


def data_facts(cfg: Config) -> dict:
    """input_dim/num_classes or vocab_size/seq_len of cfg.data, without loading
    the data where the source tells (mnist1d, digits, text and any LM data with
    the byte tokenizer)."""
    d = cfg.data
    if d.name == "mnist1d":
        return {"input_dim": 40, "num_classes": 10}
    if d.name == "digits":
        return {"input_dim": 64, "num_classes": 10}
    if d.name == "text" or cfg.model.kind in ("gpt", "hf"):
        if d.tokenizer == "byte":
            vocab = 256
        else:
            from mi_scale.data.tokens import load_tokenizer
            vocab = load_tokenizer(d.tokenizer).vocab_size
        return {"vocab_size": vocab, "seq_len": d.seq_len}
    # files/hub feeding an mlp: the features are only known from the data
    from mi_scale.data import build_data
    b = build_data(d, cfg.run.seed)
    return {"input_dim": b.input_dim, "num_classes": b.num_classes, "vocab_size": b.vocab_size,
            "seq_len": b.seq_len}


def model_facts(cfg: Config) -> ModelFacts:
    from mi_scale.mi.regularizer import match_layers
    from mi_scale.models import build_model, default_hook_patterns

    facts = data_facts(cfg)
    model = build_model(cfg.model, input_dim=facts.get("input_dim"), num_classes=facts.get("num_classes"),
                        vocab_size=facts.get("vocab_size"), seq_len=facts.get("seq_len"), device="meta")
    sizes = [p.numel() for p in model.parameters()]
    layers = cfg.mi.layers
    if cfg.model.kind == "hf" and layers == ["blocks.*"]:
        layers = default_hook_patterns(cfg.model, model)
    hooked = match_layers(model, layers)
    modules = dict(model.named_modules())

    def out_width(name: str, default: int) -> int:
        ws = [p.shape[0] for p in modules[name].parameters() if p.dim() >= 1]
        return int(ws[-1]) if ws else default

    if cfg.model.kind == "gpt":
        g = model.cfg
        n_layer, width, vocab, seq = g.n_layer, g.d_model, g.vocab_size, cfg.data.seq_len
    elif cfg.model.kind == "hf":
        c = model.config  # activations: the GPT block constants, an estimate for other blocks
        width = next(getattr(c, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(c, k))
        n_layer = next(getattr(c, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(c, k))
        vocab, seq = c.vocab_size, cfg.data.seq_len
    else:
        n_layer, width, vocab, seq = cfg.model.depth, cfg.model.width, facts["num_classes"], 1
    return ModelFacts(kind=cfg.model.kind, params=sum(sizes), largest_param=max(sizes, default=0),
                      param_sizes=sizes, n_layer=n_layer, width=width, vocab=vocab, seq_len=seq,
                      input_dim=facts.get("input_dim") or 0, hooked=hooked,
                      hooked_widths=[out_width(n, width) for n in hooked])
