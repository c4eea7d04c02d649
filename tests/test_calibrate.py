"""Calibration from JSONL: covariances against float64 references, batching, cache, bad inputs.

Everything is built in the test: tiny Llama/BERT/GPT-2 checkpoints (surgery.demo) and a WordLevel
tokenizer from the ``tokenizers`` library, saved into the checkpoint folder with a chat template.
References capture activations with their own hooks on a model loaded independently through
``from_pretrained`` at batch size 1, and do the normalisation and sums in float64 numpy.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery import demo
from surgery.calibrate import (
    build_model,
    calibrate,
    parse_memory,
    plan_calibration,
    read_calib,
)
from surgery.checkpoint import Checkpoint
from surgery.errors import SurgeryError
from surgery.stats import Stats, write_stats

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

WORDS = (
    "the a cat dog sat on mat ran fast slow big small red blue green hello world user "
    "assistant system : . , ! ? is was and or not very"
).split()
CHAT = "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
TEXTS = [
    "the cat sat on the mat",
    "a dog ran fast",
    "hello world",
    "the big red dog was very slow and the small blue cat was not",
    "green",
    "is the cat on the mat ? the dog is not",
    "a small cat , a big dog , a red mat !",
]


def make_tokenizer(folder: Path) -> None:
    """Save a WordLevel tokenizer (ids < 64) with a chat template into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) < 64
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT
    fast.save_pretrained(str(folder))


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    d = demo.tiny_llama(tmp_path_factory.mktemp("llama") / "m", layers=2)
    make_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    d = demo.tiny_bert(tmp_path_factory.mktemp("bert") / "m", layers=1)
    make_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Mixed line kinds, uneven lengths (padding matters), one blank line."""
    rng = np.random.default_rng(0)
    lines: list = [{"text": t} for t in TEXTS]
    lines.insert(3, "")
    lines.append({"input_ids": [int(i) for i in rng.integers(3, 64, size=17)]})
    lines.append({"prompt": "the cat is", "completion": " on the mat"})
    lines.append(
        {
            "messages": [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hello world !"},
            ]
        }
    )
    lines.append({"input_ids": [5]})  # a one-token sample
    return write_jsonl(tmp_path_factory.mktemp("data") / "calib.jsonl", lines)


def token_ids(folder: Path, path: Path) -> list[list[int]]:
    """Independent tokenisation of the data file (what the samples must be)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        o = json.loads(line)
        if "input_ids" in o:
            out.append(o["input_ids"])
        elif "messages" in o:
            text = tok.apply_chat_template(o["messages"], tokenize=False)
            out.append(tok(text, add_special_tokens=False)["input_ids"])
        elif "prompt" in o:
            out.append(tok(o["prompt"] + o["completion"])["input_ids"])
        else:
            out.append(tok(o["text"])["input_ids"])
    return out


def capture(folder: Path, samples: list[list[int]], cls_name: str) -> dict[str, list[np.ndarray]]:
    """Inputs of every Linear/Conv1D, captured per sample at batch size 1 (float64 copies)."""
    from transformers.pytorch_utils import Conv1D

    cls = getattr(transformers, cls_name)
    model = cls.from_pretrained(str(folder)).eval()
    got: dict[str, list[np.ndarray]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)):

            def hook(m, args, out, name=name):
                x = args[0].detach().double().numpy()
                got.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for ids in samples:
            model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return got


def reference_cov(xs: list[np.ndarray], norm: str = "max") -> np.ndarray:
    """float64 CorDA covariance: per-sample X / |signed max|, Σ XᵀX / n (or token-weighted)."""
    c = np.zeros((xs[0].shape[1],) * 2)
    for x in xs:
        if norm == "max":
            x = x / abs(x.max())
        c += x.T @ x
    return c / (len(xs) if norm == "max" else sum(x.shape[0] for x in xs))


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------------------------
# Covariances against float64 references
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["max", "none"])
def test_llama_covariances_match_float64_reference(llama, data, tmp_path, norm):
    out = calibrate(
        llama,
        data,
        out=tmp_path / "s.safetensors",
        batch_size=1,
        cov_norm=norm,
        cov_dtype="fp64",
        cache_dir=False,
    )
    st = Stats.open(out)
    ids = token_ids(llama, data)
    ref = capture(llama, ids, "LlamaForCausalLM")
    mods = [m for m in ref if m != "lm_head"]
    assert sorted(st.modules()) == sorted(mods)  # all-linear: every Linear except the head
    for m in mods:
        assert len(ref[m]) == len(ids)
        c = st.cov(m)
        assert c.dtype == torch.float64
        assert rel(c, reference_cov(ref[m], norm)) < 1e-9, m
        assert st.count(m, "samples") == len(ids)
        assert st.count(m, "tokens") == sum(len(i) for i in ids)
    assert st.convention == norm
    assert st.meta["options"]["cov_norm"] == norm


def test_first_layer_covariance_by_hand(llama, data, tmp_path):
    """Layer 0's q_proj input is RMSNorm(embedding): compute it in float64 without transformers."""
    out = calibrate(llama, data, out=tmp_path / "s.safetensors", batch_size=3, cache_dir=False)
    ck = Checkpoint.open(llama)
    emb = ck.get("model.embed_tokens.weight").double().numpy()
    w = ck.get("model.layers.0.input_layernorm.weight").double().numpy()
    xs = []
    for ids in token_ids(llama, data):
        h = emb[ids]
        xs.append(h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-6) * w)
    c = Stats.open(out).cov("model.layers.0.self_attn.q_proj")
    assert c.dtype == torch.float32
    assert rel(c, reference_cov(xs)) < 2e-6
    # q, k and v share one input (computed once, added three times): identical covariances.
    st = Stats.open(out)
    for m in ("k_proj", "v_proj"):
        assert torch.equal(st.cov(f"model.layers.0.self_attn.{m}"), c)


@pytest.mark.parametrize("norm", ["max", "none"])
def test_batch_size_independence(llama, data, tmp_path, norm):
    covs = []
    for bs in (1, 3, 16):
        out = calibrate(
            llama,
            data,
            out=tmp_path / f"s{bs}.safetensors",
            batch_size=bs,
            cov_norm=norm,
            cache_dir=False,
        )
        covs.append(Stats.open(out))
    for m in covs[0].modules():
        a = covs[0].cov(m)
        for other in covs[1:]:
            assert rel(other.cov(m), a) < 1e-5, m
            assert other.count(m, "tokens") == covs[0].count(m, "tokens")


def test_bert_pooler_one_token_per_sample(bert, data, tmp_path):
    ids = token_ids(bert, data)
    ref = capture(bert, ids, "BertModel")
    outs = [
        Stats.open(
            calibrate(
                bert,
                data,
                out=tmp_path / f"b{bs}.safetensors",
                batch_size=bs,
                cov_dtype="fp64",
                cache_dir=False,
            )
        )
        for bs in (1, 4)
    ]
    assert "pooler.dense" in outs[0].modules()
    # The pooler sees only the first token of each sample.
    assert all(x.shape[0] == 1 for x in ref["pooler.dense"])
    for st in outs:
        assert st.count("pooler.dense", "tokens") == len(ids)
        assert st.count("pooler.dense", "samples") == len(ids)
        for m in st.modules():
            assert rel(st.cov(m), reference_cov(ref[m])) < 1e-5, m


def test_gpt2_conv1d_and_bf16(tmp_path):
    """Conv1D modules are hooked; a bf16 checkpoint is loaded in bf16 and hooks upcast."""
    g = demo.tiny_gpt2(tmp_path / "g")
    lines = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4, 5, 9]}, {"input_ids": [7, 8]}])
    st = Stats.open(calibrate(g, lines, out=tmp_path / "g.safetensors", cache_dir=False))
    assert "transformer.h.0.attn.c_attn" in st.modules()
    assert st.check(Checkpoint.open(g), st.modules()) == []
    ref = capture(g, [[3, 4, 5, 9], [7, 8]], "GPT2LMHeadModel")
    assert (
        rel(st.cov("transformer.h.1.mlp.c_proj"), reference_cov(ref["transformer.h.1.mlp.c_proj"]))
        < 1e-5
    )

    b = demo.tiny_llama(tmp_path / "bf", dtype="bfloat16")
    model, _ = build_model(Checkpoint.open(b))
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    st = Stats.open(
        calibrate(b, lines, out=tmp_path / "bf.safetensors", batch_size=2, cache_dir=False)
    )
    ref = capture(b, [[3, 4, 5, 9], [7, 8]], "LlamaForCausalLM")
    for m in st.modules():
        assert st.cov(m).dtype == torch.float32
        assert rel(st.cov(m), reference_cov(ref[m])) < 1e-2, m  # bf16 forward, batch 2 vs 1


def test_targets_layers_and_groups(llama, data, tmp_path, caplog):
    one = Stats.open(
        calibrate(
            llama,
            data,
            out=tmp_path / "a.safetensors",
            targets="q_proj,down_proj",
            layers="1",
            cache_dir=False,
        )
    )
    assert sorted(one.modules()) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    full = Stats.open(calibrate(llama, data, out=tmp_path / "f.safetensors", cache_dir=False))
    # A budget that fits one 48x48 fp32 covariance (or two 32x32): several passes, same result.
    budget = 48 * 48 * 4 + 10
    with caplog.at_level(logging.WARNING, logger="surgery"):
        plan = plan_calibration(llama, data, max_memory=budget)
        grouped = Stats.open(
            calibrate(llama, data, out=tmp_path / "g.safetensors", cache_dir=False, plan=plan)
        )
    assert len(plan.groups) == 8
    assert all(plan.cov_bytes(g) <= budget for g in plan.groups)
    assert sum(plan.groups, []) == plan.modules
    assert "8 passes over the data" in caplog.text
    for m in full.modules():
        assert torch.allclose(grouped.cov(m), full.cov(m), rtol=1e-6, atol=0)
    assert torch.allclose(
        one.cov("model.layers.1.mlp.down_proj"),
        full.cov("model.layers.1.mlp.down_proj"),
        rtol=1e-6,
        atol=0,
    )
    text = "\n".join(plan.describe())
    assert "8 pass(es)" in text and "covariances" in text


def test_samples_seq_len_max_tokens(llama, data):
    ids = token_ids(llama, data)
    from surgery.calibrate import load_tokenizer

    tok = load_tokenizer(llama)
    s = read_calib(data, tokenizer=tok, samples=3)
    assert [list(x.ids) for x in s] == ids[:3]
    assert [x.line for x in s] == [1, 2, 3]
    s = read_calib(data, tokenizer=tok, seq_len=4)
    assert all(len(x.ids) == min(4, len(i)) for x, i in zip(s, ids))
    s = read_calib(data, tokenizer=tok, max_tokens=20)  # 7 + 5 + 3 + 5 of the 4th sample
    assert sum(len(x.ids) for x in s) == 20
    assert s[-1].line == 5  # line 4 is blank: the lines keep their file numbers
    assert list(s[-1].ids) == ids[3][:5]


def test_progress_reports_rates(llama, data, tmp_path):
    seen = []
    calibrate(
        llama,
        data,
        out=tmp_path / "s.safetensors",
        batch_size=4,
        cache_dir=False,
        progress=seen.append,
    )
    assert len(seen) == 3  # 11 samples in batches of 4
    last = seen[-1]
    assert last.samples == last.total_samples == 11
    assert last.tokens == last.total_tokens > 0
    assert last.samples_per_s > 0 and last.tokens_per_s > 0


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------
def test_cache_hit_and_miss(llama, data, tmp_path, caplog):
    cache = tmp_path / "cache"
    calls = []
    out = calibrate(
        llama, data, out=tmp_path / "s.safetensors", cache_dir=cache, progress=calls.append
    )
    n = len(calls)
    assert n > 0
    before = out.read_bytes()
    with caplog.at_level(logging.INFO, logger="surgery"):
        again = calibrate(
            llama, data, out=out, batch_size=1, cache_dir=cache, progress=calls.append
        )
    assert again == out and len(calls) == n  # no forward pass: cache hit (batch size not keyed)
    assert "cache hit" in caplog.text
    assert out.read_bytes() == before
    # Another output path: copied from the indexed earlier result.
    other = calibrate(
        llama, data, out=tmp_path / "o.safetensors", cache_dir=cache, progress=calls.append
    )
    assert len(calls) == n and other.read_bytes() == before
    # Different options or data: recomputed.
    calibrate(
        llama,
        data,
        out=tmp_path / "p.safetensors",
        seq_len=5,
        cache_dir=cache,
        progress=calls.append,
    )
    assert len(calls) > n
    m = len(calls)
    data2 = write_jsonl(tmp_path / "d2.jsonl", [{"text": "the cat"}])
    calibrate(llama, data2, out=out, cache_dir=cache, progress=calls.append)
    assert len(calls) > m
    assert Stats.open(out).fingerprint != Stats.open(other).fingerprint


# ------------------------------------------------------------------------------------------------
# Bad inputs: one SurgeryError, with line numbers, before any forward pass
# ------------------------------------------------------------------------------------------------
BAD_LINES = [
    ('{"text": "the cat"}\n{"text": \n', r"calib.jsonl:2: invalid JSON"),
    ("[1, 2]\n", r"calib.jsonl:1: expected a JSON object, got list"),
    (
        '{"text": "a"}\n{"content": "x", "id": 3}\n',
        r"calib.jsonl:2: no known field \(found: content, id\)",
    ),
    ('{"text": ""}\n', r"calib.jsonl:1: 'text' is empty"),
    ('{"text": 5}\n', r"calib.jsonl:1: 'text' must be a string"),
    ('{"input_ids": [1, "a"]}\n', r"calib.jsonl:1: 'input_ids' must be a list of integers"),
    ('{"input_ids": []}\n', r"calib.jsonl:1: 'input_ids' is empty"),
    ('{"input_ids": [1, 2]}\n{"input_ids": [3, 640]}\n', r"calib.jsonl:2: token id 640 is outside"),
    ('{"messages": "hi"}\n', r"calib.jsonl:1: 'messages' must be a non-empty list"),
    ('{"prompt": 3, "completion": "x"}\n', r"calib.jsonl:1: 'prompt' and 'completion' must be"),
    ("", r"has no samples"),
    ("\n  \n", r"has no samples"),
]


@pytest.mark.parametrize("content,match", BAD_LINES)
def test_bad_lines(llama, tmp_path, content, match):
    p = tmp_path / "calib.jsonl"
    p.write_text(content)
    calls = []
    with pytest.raises(SurgeryError, match=match):
        calibrate(llama, p, out=tmp_path / "s.safetensors", cache_dir=False, progress=calls.append)
    assert calls == [] and not (tmp_path / "s.safetensors").exists()


def test_all_bad_lines_listed_together(llama, tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", ["{", {"text": "ok"}, {"foo": 1}, "3"])
    with pytest.raises(SurgeryError) as e:
        calibrate(llama, p, out=tmp_path / "s.safetensors", cache_dir=False)
    msg = str(e.value)
    assert (
        "3 bad line(s)" in msg
        and "c.jsonl:1:" in msg
        and "c.jsonl:3:" in msg
        and "c.jsonl:4:" in msg
    )


def test_tokenizer_and_template_errors(tmp_path):
    m = demo.tiny_llama(tmp_path / "m")  # no tokenizer files
    p = write_jsonl(tmp_path / "c.jsonl", [{"input_ids": [3, 4]}, {"text": "the cat"}])
    with pytest.raises(SurgeryError, match=r"line 2.*no tokenizer files.*--tokenizer"):
        calibrate(m, p, out=tmp_path / "s.safetensors", cache_dir=False)
    # input_ids only: no tokenizer needed.
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"input_ids": [3, 4]}])
    assert calibrate(m, ok, out=tmp_path / "s.safetensors", cache_dir=False).is_file()
    # --tokenizer from elsewhere, but without a chat template for messages lines.
    tokdir = tmp_path / "tok"
    make_tokenizer(tokdir)
    cfg = json.loads((tokdir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tokdir / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in ("chat_template.jinja", "chat_template.json"):
        (tokdir / f).unlink(missing_ok=True)
    msgs = write_jsonl(
        tmp_path / "m.jsonl", [{"text": "a cat"}, {"messages": [{"role": "user", "content": "hi"}]}]
    )
    with pytest.raises(SurgeryError, match=r"m.jsonl:2: 'messages' need a chat template"):
        calibrate(m, msgs, out=tmp_path / "s.safetensors", tokenizer=tokdir, cache_dir=False)
    assert calibrate(
        m, p, out=tmp_path / "t.safetensors", tokenizer=tokdir, cache_dir=False
    ).is_file()


def test_option_and_model_errors(llama, data, tmp_path):
    kw = {"out": tmp_path / "s.safetensors", "cache_dir": False}
    with pytest.raises(SurgeryError, match=r"--cov-norm must be 'max' or 'none', got 'abs'"):
        calibrate(llama, data, cov_norm="abs", **kw)
    with pytest.raises(SurgeryError, match=r"--cov-dtype must be"):
        calibrate(llama, data, cov_dtype="fp16", **kw)
    with pytest.raises(SurgeryError, match=r"--batch-size must be a positive integer, got 0"):
        calibrate(llama, data, batch_size=0, **kw)
    with pytest.raises(SurgeryError, match=r"--seq-len 4096 exceeds the model's 128 positions"):
        calibrate(llama, data, seq_len=4096, **kw)
    with pytest.raises(SurgeryError, match=r"--calib-samples must be a positive integer"):
        calibrate(llama, data, samples=0, **kw)
    with pytest.raises(SurgeryError, match=r"model.layers.0.mlp.down_proj.*over --max-memory"):
        calibrate(llama, data, max_memory="4KB", **kw)
    with pytest.raises(SurgeryError, match=r"--max-memory: cannot parse"):
        calibrate(llama, data, max_memory="lots", **kw)
    with pytest.raises(
        SurgeryError, match=r"embed_tokens: matched --targets but is not an nn.Linear"
    ):
        calibrate(llama, data, targets="embed_tokens,q_proj", **kw)
    with pytest.raises(SurgeryError, match=r"match no 2-D weight"):
        calibrate(llama, data, targets="nope_proj", **kw)
    with pytest.raises(SurgeryError, match=r"no such calibration file"):
        calibrate(llama, tmp_path / "missing.jsonl", **kw)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((Path(llama) / "model.safetensors").read_bytes())
    with pytest.raises(SurgeryError, match=r"config.json.*--config"):
        calibrate(bare, data, **kw)
    # --config from elsewhere works.
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"input_ids": [3, 4]}])
    assert calibrate(bare, ok, config=llama, **kw).is_file()
    assert not (tmp_path / ".s.safetensors.tmp").exists()


def test_nan_activation_names_module_and_line(tmp_path):
    m = demo.tiny_llama(tmp_path / "m")
    ck = Checkpoint.open(m)
    tensors = {n: ck.get(n) for n in ck.names()}
    tensors["model.embed_tokens.weight"][9] = float("inf")  # token 9 poisons its sample
    demo.save_checkpoint(tensors, tmp_path / "nan", ck.config)
    p = write_jsonl(
        tmp_path / "c.jsonl",
        [{"input_ids": [3, 4, 5]}, {"input_ids": [6, 7]}, {"input_ids": [3, 9, 4]}],
    )
    with pytest.raises(
        SurgeryError,
        match=r"model.layers.0.self_attn.q_proj: non-finite activation "
        r"\(NaN/Inf\).*line 3 of c.jsonl",
    ):
        calibrate(
            tmp_path / "nan", p, out=tmp_path / "s.safetensors", batch_size=2, cache_dir=False
        )
    assert not (tmp_path / "s.safetensors").exists()
    assert not list(tmp_path.glob(".s*")), "a temporary stats file was left behind"


def test_parse_memory():
    assert parse_memory("8GB") == 8 * 2**30
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory(1000) == 1000
    assert parse_memory(None) is None and parse_memory("auto") is None
    with pytest.raises(SurgeryError):
        parse_memory(-1)


# ------------------------------------------------------------------------------------------------
# Stats file
# ------------------------------------------------------------------------------------------------
def test_stats_file_roundtrip_and_check(llama, tmp_path):
    ck = Checkpoint.open(llama)
    q = "model.layers.0.self_attn.q_proj"
    d = "model.layers.0.mlp.down_proj"
    p = write_stats(
        tmp_path / "st.safetensors",
        {
            f"{q}.cov": torch.eye(32),
            f"{q}.samples": torch.tensor([3]),
            f"{d}.cov": torch.eye(32, dtype=torch.float64),
        },
        fingerprint="abc",
        convention="max",
        options={"k": [1, 2]},
    )
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary file
    st = Stats.open(p)
    assert st.meta["options"] == {"k": [1, 2]} and st.fingerprint == "abc"
    assert sorted(st.modules()) == sorted([q, d]) and q in st and len(st) == 2
    assert st.count(q) == 3 and st.count(d) == 0
    assert st.cov(d).dtype == torch.float64
    problems = st.check(ck, [q, d + ".weight", "model.layers.1.mlp.up_proj"])
    assert len(problems) == 2
    assert "needs [48, 48]" in problems[0] and "model.layers.0.mlp.down_proj" in problems[0]
    assert "no 'model.layers.1.mlp.up_proj.cov'" in problems[1]
    with pytest.raises(SurgeryError, match=r"did you mean 'model.layers.0.self_attn.q_proj'"):
        st.cov("model.layers.0.self_attn.q_prj")
    with pytest.raises(SurgeryError, match=r"never loads pickles"):
        Stats.open(tmp_path / "cov.pt")
    with pytest.raises(SurgeryError, match=r"surgery calibrate"):
        Stats.open(tmp_path / "none.safetensors")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_cli_calibrate(llama, data, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    out = tmp_path / "cli.safetensors"
    args = ["calibrate", str(llama), "--calib", str(data), "--batch-size", "3", "--no-cache"]
    r = CliRunner().invoke(cli, [*args, "-o", str(out), "--cov-dtype", "fp64", "--seq-len", "6"])
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output
    api = calibrate(
        llama,
        data,
        out=tmp_path / "api.safetensors",
        batch_size=3,
        seq_len=6,
        cov_dtype="fp64",
        cache_dir=False,
    )
    a, b = Stats.open(out), Stats.open(api)
    assert a.fingerprint == b.fingerprint
    for m in a.modules():
        assert torch.allclose(a.cov(m), b.cov(m), rtol=1e-12, atol=0)
    r = CliRunner().invoke(cli, [*args, "--dry-run", "--max-memory", "20KB"])
    assert r.exit_code == 0, r.output
    assert "estimated peak memory" in r.output and "pass(es) over the data" in r.output
    assert not (tmp_path / "x.safetensors").exists()
    r = CliRunner().invoke(
        cli,
        [
            "calibrate",
            str(llama),
            "--calib",
            str(tmp_path / "no.jsonl"),
            "-o",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert r.exit_code == 1 and "Error: " in r.output and "no such calibration file" in r.output
    r = CliRunner().invoke(cli, ["calibrate", str(llama), "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "--calib FILE.jsonl is required" in r.output


def test_decompose_calib_equals_stats_and_peft_reproduces(llama, data, tmp_path):
    """`decompose --calib` == `calibrate` + `decompose --stats`; PEFT reproduces the original."""
    from click.testing import CliRunner
    from peft import PeftModel
    from safetensors.torch import load_file

    from cli import cli

    run = CliRunner().invoke
    via_calib = tmp_path / "via_calib"
    common = ["-m", "corda", "-r", "4", "-q"]
    r = run(cli, ["decompose", str(llama), "--calib", str(data), "--dry-run", *common, "-o",
                  str(via_calib)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "calibration: estimated peak memory" in r.output
    assert not via_calib.exists() and not (tmp_path / "via_calib.stats.safetensors").exists()
    r = run(cli, ["decompose", str(llama), "--calib", str(data), "--batch-size", "3",
                  "--no-cache", *common, "-o", str(via_calib)])  # fmt: skip
    assert r.exit_code == 0, r.output
    kept = tmp_path / "via_calib.stats.safetensors"  # the stats stay beside the output
    assert Stats.open(kept).convention == "max"
    stats = calibrate(llama, data, out=tmp_path / "s.safetensors", batch_size=3, cache_dir=False)
    via_stats = tmp_path / "via_stats"
    r = run(cli, ["decompose", str(llama), "--stats", str(stats), *common, "-o", str(via_stats)])
    assert r.exit_code == 0, r.output
    # The library call takes the same calibration options (the CLI is a layer over it).
    from surgery.api import decompose

    opts = {"batch_size": 3, "no_cache": True}
    via_api = decompose(str(llama), method="corda", rank=4, calib=str(data), calib_options=opts,
                        out=tmp_path / "api")  # fmt: skip
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(via_calib / f)), load_file(str(via_stats / f))
        c = load_file(str(via_api / f))
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a), f

    # The residual model plus the adapter, through PEFT, gives the original model's outputs.
    cls = transformers.LlamaForCausalLM
    ids = torch.tensor([[1, 5, 9, 12, 7, 3, 22]])
    with torch.no_grad():
        want = cls.from_pretrained(str(llama)).eval()(input_ids=ids).logits
        peft = PeftModel.from_pretrained(cls.from_pretrained(str(via_calib)), str(via_calib),
                                         subfolder="adapter").eval()  # fmt: skip
        got = peft(input_ids=ids).logits
        residual_only = cls.from_pretrained(str(via_calib)).eval()(input_ids=ids).logits
    assert rel(got, want) < 1e-4
    assert rel(residual_only, want) > 1e-3  # the adapter carries a real part of the weights

    # Same command again (--force): the stats beside the output are reused, not recomputed.
    before = kept.stat().st_mtime_ns
    r = run(cli, ["decompose", str(llama), "--calib", str(data), "--batch-size", "3", *common,
                  "-o", str(via_calib), "--force"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert kept.stat().st_mtime_ns == before
    b = load_file(str(via_stats / "model.safetensors"))
    a = load_file(str(via_calib / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device visible to torch")
def test_cuda_matches_cpu(llama, data, tmp_path):
    cpu = Stats.open(calibrate(llama, data, out=tmp_path / "c.safetensors", device="cpu",
                               cache_dir=False))  # fmt: skip
    gpu = Stats.open(calibrate(llama, data, out=tmp_path / "g.safetensors", device="cuda",
                               batch_size=8, cache_dir=False))  # fmt: skip
    for m in cpu.modules():
        assert rel(gpu.cov(m), cpu.cov(m)) < 1e-4, m


_CALIB_MEM = """
import resource, sys
from surgery.calibrate import calibrate
calibrate(sys.argv[1], sys.argv[2], out=sys.argv[3], max_memory=sys.argv[4], targets=sys.argv[5],
          layers=sys.argv[6] or None, batch_size=4, cache_dir=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_grouped_calibration_holds_one_group_in_memory(tmp_path):
    """Peak RSS follows --max-memory: a finished group's covariances go to the file at once.

    Four 4096-wide down_proj inputs make 256 MiB of fp32 covariances. With a 70 MB budget each
    pass holds one (64 MiB), so the peak must equal that of calibrating one down_proj alone (which
    includes the BLAS workspace of its 4096² GEMM), not grow with the finished groups.
    """
    src = demo.tiny_llama(tmp_path / "m", layers=4, hidden=256, inter=4096, dtype="bfloat16")
    rng = np.random.default_rng(0)
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"input_ids": [int(i) for i in rng.integers(3, 64, size=48)]} for _ in range(8)
    ])  # fmt: skip

    def peak(budget: str, targets: str, out: str, layers: str = "") -> int:
        r = subprocess.run(
            [sys.executable, "-c", _CALIB_MEM, str(src), str(data), str(tmp_path / out), budget,
             targets, layers],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(r.stdout.strip().splitlines()[-1])

    mib = 2**20
    single = peak("1GB", "down_proj", "s.safetensors", layers="0")  # model + 1 cov + workspace
    one_group = peak("1GB", "all-linear", "a.safetensors")
    grouped = peak("70MB", "all-linear", "g.safetensors")
    assert one_group - single > 150 * mib, "the measurement misses the covariances"
    # Less than one more covariance (64 MiB); measured 6-37 MiB of allocator noise. Holding the
    # finished groups, as the old code did, measured +216 MiB.
    assert grouped - single < 64 * mib, f"grouped: {(grouped - single) / mib:.0f} MiB over one cov"
    a, g = Stats.open(tmp_path / "a.safetensors"), Stats.open(tmp_path / "g.safetensors")
    for m in a.modules():
        assert torch.equal(a.cov(m), g.cov(m)), m


def test_modules_fed_the_same_input_share_one_covariance(llama, data, tmp_path, caplog):
    """q/k/v and gate/up get the very same input tensor: one accumulator and one stored
    covariance per set (``cov_alias``), equal to what separate accumulators give."""
    from surgery.checkpoint import read_header

    out = calibrate(llama, data, out=tmp_path / "s.safetensors", cache_dir=False)
    st = Stats.open(out)
    meta, infos = read_header(out)
    alias = json.loads(meta["cov_alias"])
    want = {}
    for li in range(2):
        a, m = f"model.layers.{li}.self_attn.", f"model.layers.{li}.mlp."
        want.update({a + "k_proj": a + "q_proj", a + "v_proj": a + "q_proj",
                     m + "up_proj": m + "gate_proj"})  # fmt: skip
    assert alias == want
    assert not any(f"{k}.cov" in infos for k in alias)  # stored once
    ref = capture(llama, token_ids(llama, data), "LlamaForCausalLM")
    assert sorted(st.modules()) == sorted(m for m in ref if m != "lm_head")
    for k, root in alias.items():
        assert st.shared(k) == root and st.shared(root) is None
        assert st.has(k) and st.shape(k) == st.shape(root)
        assert torch.equal(st.cov(k), st.cov(root))
        assert np.array_equal(st.cov_array(k), st.cov_array(root))
        assert rel(st.cov(k), reference_cov(ref[k])) < 1e-5, k  # k's own inputs, by hand
        assert st.count(k, "tokens") == st.count(root, "tokens") > 0
    # A budget of one 48×48 covariance: the plan (no forward yet) counts q, k, v apart, the run
    # groups each set with its root, so fewer passes give the same covariances.
    budget = 48 * 48 * 4 + 10
    plan = plan_calibration(llama, data, max_memory=budget)
    seen = set()
    grouped = Stats.open(calibrate(llama, data, out=tmp_path / "g.safetensors", cache_dir=False,
                                   plan=plan, progress=lambda p: seen.add(p.groups)))  # fmt: skip
    assert len(plan.groups) == 8 and seen and max(seen) < 8
    for m in st.modules():
        assert torch.allclose(grouped.cov(m), st.cov(m), rtol=1e-6, atol=0), m
    # GPT-2's fused c_attn and its MLP share nothing: no alias metadata.
    g = demo.tiny_gpt2(tmp_path / "g2")
    make_tokenizer(g)
    meta, _ = read_header(calibrate(g, data, out=tmp_path / "g2.safetensors", cache_dir=False))
    assert "cov_alias" not in meta
