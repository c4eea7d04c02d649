"""Tiny deterministic checkpoints and calibration data, built locally (never downloaded).

Used by the README's first command, the notebooks, the tests and the benchmarks. The tensors are
random but seeded, and the ``config.json`` files are complete enough for ``transformers`` to build
the model (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ``BertModel``).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["tiny_llama", "tiny_gpt2", "tiny_bert", "finetune", "save_checkpoint", "demo_jsonl"]


def _gen(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return g


def save_checkpoint(
    tensors: dict, out: str | Path, config: dict | None = None, shards: int = 1
) -> Path:
    """Write ``tensors`` as HF safetensors (``model.safetensors``, or ``shards`` files + index).

    Args:
        tensors: name → torch tensor.
        out: output folder (created).
        config: written as ``config.json`` when given.
        shards: number of shard files (> 1 writes ``model.safetensors.index.json``).
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards <= 1:
        save_file(
            {k: tensors[k].contiguous() for k in names},
            str(out / "model.safetensors"),
            metadata={"format": "pt"},
        )
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for i in range(shards):
            part = names[i * per : (i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(
                {k: tensors[k].contiguous() for k in part},
                str(out / fname),
                metadata={"format": "pt"},
            )
            weight_map.update({k: fname for k in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2,
            )
        )
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def tiny_llama(
    out: str | Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    inter: int = 48,
    vocab: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    dtype: str = "float32",
    shards: int = 1,
    seed: int = 0,
    int_buffer: bool = False,
    max_positions: int = 128,
) -> Path:
    """Write a random Llama-shaped checkpoint that ``LlamaForCausalLM`` loads.

    Linear weights are drawn with a decaying spectrum (like trained weights), so low-rank methods
    have structure to find. ``int_buffer`` adds a non-float ``I64`` tensor to test copy-through.
    """
    import torch

    g = _gen(seed)
    head_dim = hidden // heads
    t: dict[str, torch.Tensor] = {}

    def lin(o: int, i: int) -> torch.Tensor:
        # U diag(decaying) V^T plus small noise: realistic spectra at tiny sizes.
        k = min(o, i)
        u, _ = torch.linalg.qr(torch.randn(o, k, generator=g))
        v, _ = torch.linalg.qr(torch.randn(i, k, generator=g))
        s = torch.exp(-torch.arange(k, dtype=torch.float32) / (k / 4)) * (1.0 / i**0.5) * 4
        return (u * s) @ v.T + 0.002 * torch.randn(o, i, generator=g)

    t["model.embed_tokens.weight"] = 0.02 * torch.randn(vocab, hidden, generator=g)
    for li in range(layers):
        p = f"model.layers.{li}."
        t[p + "self_attn.q_proj.weight"] = lin(heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = lin(kv_heads * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = lin(kv_heads * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = lin(hidden, heads * head_dim)
        t[p + "mlp.gate_proj.weight"] = lin(inter, hidden)
        t[p + "mlp.up_proj.weight"] = lin(inter, hidden)
        t[p + "mlp.down_proj.weight"] = lin(hidden, inter)
        t[p + "input_layernorm.weight"] = 1 + 0.05 * torch.randn(hidden, generator=g)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.05 * torch.randn(hidden, generator=g)
    t["model.norm.weight"] = torch.ones(hidden)
    t["lm_head.weight"] = 0.02 * torch.randn(vocab, hidden, generator=g)
    tdt = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float64": torch.float64,
    }[dtype]
    t = {k: v.to(tdt) for k, v in t.items()}
    if int_buffer:
        t["model.rotary_positions"] = torch.arange(16, dtype=torch.int64)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": dtype, "bos_token_id": 1,
        "eos_token_id": 2, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
    }  # fmt: skip
    return save_checkpoint(t, out, config, shards)


def tiny_gpt2(
    out: str | Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    vocab: int = 64,
    heads: int = 4,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write a random GPT-2 checkpoint (``Conv1D`` weights stored ``(in, out)``)."""
    import torch

    g = _gen(seed)
    t: dict[str, torch.Tensor] = {
        "transformer.wte.weight": 0.02 * torch.randn(vocab, hidden, generator=g),
        "transformer.wpe.weight": 0.02 * torch.randn(64, hidden, generator=g),
    }
    for li in range(layers):
        p = f"transformer.h.{li}."
        t[p + "ln_1.weight"] = torch.ones(hidden)
        t[p + "ln_1.bias"] = torch.zeros(hidden)
        t[p + "attn.c_attn.weight"] = 0.1 * torch.randn(hidden, 3 * hidden, generator=g)
        t[p + "attn.c_attn.bias"] = 0.01 * torch.randn(3 * hidden, generator=g)
        t[p + "attn.c_proj.weight"] = 0.1 * torch.randn(hidden, hidden, generator=g)
        t[p + "attn.c_proj.bias"] = torch.zeros(hidden)
        t[p + "ln_2.weight"] = torch.ones(hidden)
        t[p + "ln_2.bias"] = torch.zeros(hidden)
        t[p + "mlp.c_fc.weight"] = 0.1 * torch.randn(hidden, 4 * hidden, generator=g)
        t[p + "mlp.c_fc.bias"] = torch.zeros(4 * hidden)
        t[p + "mlp.c_proj.weight"] = 0.1 * torch.randn(4 * hidden, hidden, generator=g)
        t[p + "mlp.c_proj.bias"] = torch.zeros(hidden)
    t["transformer.ln_f.weight"] = torch.ones(hidden)
    t["transformer.ln_f.bias"] = torch.zeros(hidden)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    t = {k: v.to(tdt) for k, v in t.items()}
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
        "n_embd": hidden, "n_layer": layers, "n_head": heads, "n_positions": 64, "n_ctx": 64,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True, "torch_dtype": dtype,
    }  # fmt: skip
    return save_checkpoint(t, out, config)


def tiny_bert(
    out: str | Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    inter: int = 64,
    vocab: int = 64,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a random BERT encoder checkpoint (``BertModel``, with pooler)."""
    import torch

    g = _gen(seed)
    r = lambda *s: 0.05 * torch.randn(*s, generator=g)  # noqa: E731
    t: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": r(vocab, hidden),
        "embeddings.position_embeddings.weight": r(64, hidden),
        "embeddings.token_type_embeddings.weight": r(2, hidden),
        "embeddings.LayerNorm.weight": torch.ones(hidden),
        "embeddings.LayerNorm.bias": torch.zeros(hidden),
        "pooler.dense.weight": r(hidden, hidden),
        "pooler.dense.bias": torch.zeros(hidden),
    }
    for li in range(layers):
        p = f"encoder.layer.{li}."
        for n in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            t[p + n + ".weight"] = r(hidden, hidden)
            t[p + n + ".bias"] = torch.zeros(hidden)
        t[p + "attention.output.LayerNorm.weight"] = torch.ones(hidden)
        t[p + "attention.output.LayerNorm.bias"] = torch.zeros(hidden)
        t[p + "intermediate.dense.weight"] = r(inter, hidden)
        t[p + "intermediate.dense.bias"] = torch.zeros(inter)
        t[p + "output.dense.weight"] = r(hidden, inter)
        t[p + "output.dense.bias"] = torch.zeros(hidden)
        t[p + "output.LayerNorm.weight"] = torch.ones(hidden)
        t[p + "output.LayerNorm.bias"] = torch.zeros(hidden)
    config = {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": vocab,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": inter, "max_position_embeddings": 64, "type_vocab_size": 2,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }  # fmt: skip
    return save_checkpoint(t, out, config)


def finetune(
    base: str | Path,
    out: str | Path,
    *,
    seed: int = 1,
    scale: float = 0.01,
    rank: int | None = None,
    shards: int = 1,
) -> Path:
    """Write a "fine-tune" of ``base``: every 2-D float weight plus a seeded perturbation.

    ``rank`` makes each perturbation low-rank (a LoRA-like fine-tune); otherwise it is dense.
    Non-weight files (config, tokenizer) are copied.
    """
    import shutil

    import torch
    from safetensors.torch import load_file

    base = Path(base)
    g = _gen(seed)
    files = sorted(base.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    for k in sorted(tensors):
        t = tensors[k]
        if t.ndim == 2 and t.is_floating_point():
            o, i = t.shape
            if rank:
                d = torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) / rank
            else:
                d = torch.randn(o, i, generator=g)
            tensors[k] = (t.float() + scale * d * t.float().std()).to(t.dtype)
    out = save_checkpoint(tensors, out, None, shards)
    for f in base.iterdir():
        if (
            f.is_file()
            and not f.name.endswith(".safetensors")
            and f.name != "model.safetensors.index.json"
        ):
            shutil.copy2(f, out / f.name)
    return out


def demo_jsonl(
    out: str | Path, *, n: int = 16, vocab: int = 64, seq: int = 12, seed: int = 0
) -> Path:
    """Write a calibration JSONL of ``{"input_ids": [...]}`` lines (no tokenizer needed)."""
    import random

    rnd = random.Random(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for _ in range(n):
            length = rnd.randint(seq // 2, seq)
            f.write(
                json.dumps({"input_ids": [rnd.randrange(3, vocab) for _ in range(length)]}) + "\n"
            )
    return out


def run_demo(out: str | Path, *, force: bool = False, progress=None) -> dict:
    """The README's main job on an embedded default: calibrate + CorDA-decompose a tiny model.

    Builds a tiny Llama checkpoint and a calibration JSONL under ``out/inputs`` (seeded; nothing is
    downloaded), runs ``surgery decompose inputs/model --calib inputs/calib.jsonl -m corda -r 8``
    into ``out/corda`` (stats kept beside it as ``out/corda.stats.safetensors``), then checks that
    residual + adapter reproduce the original weights.

    Returns:
        A summary dict (paths, modules, rank, worst relative reconstruction error, seconds).
    """
    import shutil
    import time

    import torch

    from .checkpoint import Checkpoint
    from .decompose import decompose
    from .errors import SurgeryError

    out = Path(out)
    if out.exists():
        if not force:
            raise SurgeryError(f"{out} already exists; choose another -o or pass --force")
        shutil.rmtree(out)
    t0 = time.perf_counter()
    model = tiny_llama(out / "inputs" / "model", layers=2, hidden=64, inter=96, vocab=128)
    calib = demo_jsonl(out / "inputs" / "calib.jsonl", n=32, vocab=128, seq=24)
    rank = 8
    result = decompose(
        str(model),
        method="corda",
        rank=rank,
        calib=str(calib),
        params={"mode": "ipm"},
        out=out / "corda",
        progress=progress,
    )
    # Check the claim: residual + scale·B@A == W for every targeted module.
    from .adapter import Adapter

    src, res = Checkpoint.open(model), Checkpoint.open(result)
    adapter = Adapter.load(result / "adapter")
    worst = 0.0
    for module in adapter.modules:
        name = module + ".weight"
        w = src.get(name).double()
        rebuilt = res.get(name).double() + adapter.delta(module, torch.float64)
        worst = max(worst, float((rebuilt - w).norm() / w.norm()))
    return {
        "model": str(model),
        "calib": str(calib),
        "output": str(result),
        "adapter": str(result / "adapter"),
        "modules": len(adapter.modules),
        "rank": rank,
        "max_rel_error": worst,
        "seconds": round(time.perf_counter() - t0, 2),
    }
