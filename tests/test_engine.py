"""The streaming loop, target selection and the registry's parameter schema."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
from typing import Literal

import pytest
import torch

from surgery.checkpoint import Checkpoint
from surgery.errors import SurgeryError
from surgery.manifest import Manifest
from surgery.methods import Method, parse_params, schema
from surgery.run import Plan, RunOptions, TensorResult, execute, load, out_dtype_name, store
from surgery.targets import layer_of, module_of, parse_layers, select


def _scale_task(ckpt, factor, dtype, name):
    w = load(ckpt, name)
    return TensorResult(
        name,
        tensor=store(ckpt, name, w * factor, out_dtype_name(dtype, ckpt.dtype(name))),
        report={"action": "scaled"},
    )


# -- targets ------------------------------------------------------------------------------------
def test_select_all_linear_excludes_embeddings_head_and_non_float(tiny_ckpt):
    c = Checkpoint.open(tiny_ckpt(int_buffer=True))
    names = select(c)
    assert len(names) == 2 * 7
    assert all(n.endswith("_proj.weight") for n in names)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" not in names
    with_emb = select(c, include_embeddings=True)
    assert "lm_head.weight" in with_emb and "model.embed_tokens.weight" in with_emb


def test_select_suffix_regex_exclude_layers(tiny_ckpt):
    c = Checkpoint.open(tiny_ckpt(layers=3))
    assert select(c, "q_proj,v_proj") == [
        n for n in c.names() if n.endswith(("q_proj.weight", "v_proj.weight"))
    ]
    assert len(select(c, "mlp.down_proj")) == 3
    assert len(select(c, r".*\.self_attn\.(q|k)_proj")) == 6
    assert len(select(c, "all-linear", exclude=r".*\.mlp\..*")) == 3 * 4
    assert len(select(c, "all-linear", exclude="mlp")) == 3 * 7  # PEFT: suffix on a dot boundary
    assert {layer_of(n) for n in select(c, layers="0,2")} == {0, 2}
    assert parse_layers("0,2-4") == {0, 2, 3, 4}
    with pytest.raises(SurgeryError, match="match no 2-D weight.*module names look like"):
        select(c, "nonexistent_proj")
    with pytest.raises(SurgeryError, match="cannot parse"):
        parse_layers("a-b")
    assert module_of("a.b.weight") == "a.b"


def test_select_gpt2_conv1d(tiny_gpt2):
    c = Checkpoint.open(tiny_gpt2())
    names = select(c)
    assert len(names) == 2 * 4 and all("transformer.h." in n for n in names)


# -- registry schema ----------------------------------------------------------------------------
def _kernel(
    w,
    *,
    rng=None,
    rank: int = 1,
    density: float = 0.5,
    lambda_: float = 1.0,
    mode: Literal["ipm", "kpm"] = "ipm",
    normalize: bool = False,
    niter: int | None = None,
):
    """Do a thing."""
    return w


def test_schema_and_parse_params():
    m = Method("toy", "merge", _kernel, "https://example.org")
    sch = schema(m)
    assert set(sch) == {"density", "lambda", "mode", "normalize", "niter"}  # rng/rank reserved
    p = parse_params(m, ["density=0.2", "lambda=2", "mode=kpm", "normalize=true", "niter=none"])
    assert p == {"density": 0.2, "lambda_": 2.0, "mode": "kpm", "normalize": True, "niter": None}
    assert parse_params(m, None)["density"] == 0.5
    with pytest.raises(SurgeryError, match=r"unknown parameter 'densty'.*did you mean 'density'"):
        parse_params(m, ["densty=0.1"])
    with pytest.raises(SurgeryError, match="expects float"):
        parse_params(m, ["density=high"])
    with pytest.raises(SurgeryError, match=r"did you mean 'kpm'"):
        parse_params(m, ["mode=kmp"])
    with pytest.raises(SurgeryError, match="key=value"):
        parse_params(m, ["density"])


# -- the loop -----------------------------------------------------------------------------------
def test_execute_writes_model_manifest_and_copies_through(tmp_path, tiny_ckpt):
    src = Checkpoint.open(tiny_ckpt(dtype="bfloat16", shards=2, int_buffer=True))
    names = select(src, "q_proj")
    opts = RunOptions.of({"out": tmp_path / "out", "shard_size": "20KB"})
    man = Manifest("scale")
    man.add_input("src", src)
    out = execute(
        opts.job("scale", man, names, functools.partial(_scale_task, src, 2.0, None), template=src)
    )
    dst = Checkpoint.open(out)
    assert sorted(dst.names()) == sorted(src.names())
    for n in src.names():
        if n in names:
            assert dst.dtype(n) == "BF16"
            torch.testing.assert_close(dst.raw(n).float(), src.raw(n).float() * 2)
        else:
            assert b"".join(dst.read_bytes(n)) == b"".join(src.read_bytes(n))
    assert (out / "config.json").is_file()
    m = json.loads((out / "surgery.json").read_text())
    assert m["verb"] == "scale" and len(m["tensors"]) == len(names)
    assert m["inputs"][0]["header_digest"] == src.header_digest()
    assert m["outputs"]["model"] is True
    # The card is titled by OUT, not by the temporary folder it was written in.
    assert (out / "README.md").read_text().split("---\n", 2)[2].lstrip().startswith("# out\n")


def test_execute_dtype_override_and_determinism(tmp_path, tiny_ckpt):
    src = Checkpoint.open(tiny_ckpt())
    names = select(src)

    def run(out):
        opts = RunOptions.of({"out": out, "dtype": "bf16"})
        job = opts.job(
            "scale",
            Manifest("scale"),
            names,
            functools.partial(_scale_task, src, 1.0, "bf16"),
            template=src,
            out_dtypes={n: "BF16" for n in names},
        )
        return execute(job)

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    dst = Checkpoint.open(a)
    assert {dst.dtype(n) for n in names} == {"BF16"}
    assert dst.dtype("lm_head.weight") == "F32"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_execute_conv1d_roundtrip(tmp_path, tiny_gpt2):
    src = Checkpoint.open(tiny_gpt2())
    names = select(src)
    out = execute(
        RunOptions.of({"out": tmp_path / "o"}).job(
            "scale",
            Manifest("scale"),
            names,
            functools.partial(_scale_task, src, 3.0, None),
            template=src,
        )
    )
    dst = Checkpoint.open(out)
    for n in names:
        assert dst.info(n).shape == src.info(n).shape  # stored (in, out) layout kept
        torch.testing.assert_close(dst.raw(n), src.raw(n) * 3)


def test_dry_run_writes_nothing(tmp_path, tiny_ckpt):
    src = Checkpoint.open(tiny_ckpt())
    names = select(src)
    plan = execute(
        RunOptions.of({"out": tmp_path / "o", "dry_run": True}).job(
            "scale",
            Manifest("scale"),
            names,
            functools.partial(_scale_task, src, 1.0, None),
            template=src,
        )
    )
    assert isinstance(plan, Plan)
    assert plan.computed == len(names) and plan.copied == len(src) - len(names)
    assert plan.output_bytes == src.nbytes and plan.peak_memory > 0
    assert "peak memory" in plan.render()
    assert not (tmp_path / "o").exists()


def test_dry_run_shard_count_matches_what_is_written(tmp_path, tiny_ckpt):
    """The plan uses the writer's packing rule, not total/size (which undercounts here)."""
    src = Checkpoint.open(tiny_ckpt(int_buffer=True))
    names = select(src)

    def job(**kw):
        opts = RunOptions.of({"out": tmp_path / "o", "shard_size": "20KB", **kw})
        return opts.job(
            "scale",
            Manifest("scale"),
            names,
            functools.partial(_scale_task, src, 1.0, None),
            template=src,
        )

    plan = execute(job(dry_run=True))
    out = execute(job())
    written = len(list(out.glob("*.safetensors")))
    assert written > -(-src.nbytes // 20_000)  # greedy packing needs more files than the ratio
    assert plan.shards == written


def test_run_options_reject_unknown():
    with pytest.raises(SurgeryError, match="unknown option"):
        RunOptions.of({"out": "x", "sharding": 3})
    with pytest.raises(SurgeryError, match="output folder is required"):
        RunOptions.of({})


def test_kernel_error_gets_tensor_context(tmp_path, tiny_ckpt):
    from ops.backend import OpError
    from surgery.run import call

    def bad(w):
        raise OpError("density must be in (0, 1], got 1.5")

    with pytest.raises(SurgeryError, match=r"^x\.weight \[2, 3\]: density must be"):
        call(bad, "x.weight", (2, 3), None)


def test_non_float_target_error(tiny_ckpt):
    src = Checkpoint.open(tiny_ckpt(int_buffer=True))
    with pytest.raises(SurgeryError, match="is I64; surgery computes only on"):
        load(src, "model.rotary_positions")


_MEM_SCRIPT = textwrap.dedent("""
    import functools, resource, sys
    from surgery.checkpoint import Checkpoint
    from surgery.manifest import Manifest
    from surgery.run import RunOptions, TensorResult, execute, load, store
    from surgery.targets import select

    def task(ckpt, name):
        w = load(ckpt, name)
        return TensorResult(name, tensor=store(ckpt, name, w * 0.5, ckpt.dtype(name)))

    c = Checkpoint.open(sys.argv[1])
    import torch  # noqa: F401  (baseline includes torch)
    execute(RunOptions.of({"out": sys.argv[2]}).job(
        "halve", Manifest("halve"), select(c, sys.argv[3]), functools.partial(task, c), template=c))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


@pytest.mark.slow
def test_peak_memory_bounded_by_one_tensor(tmp_path):
    """Stream a 400 MB checkpoint: peak RSS grows by about one tensor, not by the checkpoint."""
    from surgery.demo import save_checkpoint

    g = torch.Generator().manual_seed(0)
    big = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(2048, 2048, generator=g)
        for i in range(24)
    }  # 24 × 16 MiB = 384 MiB
    save_checkpoint(big, tmp_path / "big")
    small = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 8, generator=g)}
    save_checkpoint(small, tmp_path / "small")

    def peak(src, out):
        r = subprocess.run(
            [sys.executable, "-c", _MEM_SCRIPT, str(src), str(out), "up_proj"],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(r.stdout.strip().splitlines()[-1])

    base = peak(tmp_path / "small", tmp_path / "o1")
    used = peak(tmp_path / "big", tmp_path / "o2") - base
    tensor = 2048 * 2048 * 4
    ckpt_bytes = 24 * tensor
    # Bound stated in surgery/run.py: (inputs + 3) × fp32 tensor; here 1 input → 4 tensors.
    assert used < 4 * tensor + 32 * 2**20, f"peak grew by {used / 2**20:.0f} MiB"
    assert used < ckpt_bytes / 4
