"""Checkpoint and writer: header-only reads, round trips, byte-exact copy-through, atomic output."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery import demo
from surgery.checkpoint import Checkpoint, read_header
from surgery.errors import SurgeryError
from surgery.writer import Entry, OutputDir, ShardWriter, parse_size


def _all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_sharded_equals_unsharded(tmp_path, dtype):
    one = Checkpoint.open(demo.tiny_llama(tmp_path / "one", dtype=dtype, int_buffer=True))
    three = Checkpoint.open(
        demo.tiny_llama(tmp_path / "three", dtype=dtype, shards=3, int_buffer=True)
    )
    assert len(three.files) == 3
    assert sorted(one.names()) == sorted(three.names())
    for n in one.names():
        assert one.dtype(n) == three.dtype(n)
        assert one.shape(n) == three.shape(n)
        assert torch.equal(one.raw(n), three.raw(n))
    ref = _all(tmp_path / "one")
    for n, t in ref.items():
        assert torch.equal(one.raw(n), t) and one.raw(n).dtype == t.dtype


def test_single_file_and_folder_forms(tmp_path):
    d = demo.tiny_llama(tmp_path / "m")
    a = Checkpoint.open(d)
    b = Checkpoint.open(d / "model.safetensors")
    assert a.names() == b.names()
    assert a.config["model_type"] == "llama"


def test_conv1d_presented_out_in(tmp_path):
    d = demo.tiny_gpt2(tmp_path / "g")
    c = Checkpoint.open(d)
    n = "transformer.h.0.mlp.c_fc.weight"
    stored = c.info(n).shape
    assert c.is_conv1d(n) and c.shape(n) == (stored[1], stored[0])
    assert torch.equal(c.get(n), c.raw(n).T)
    assert torch.equal(c.to_stored(n, c.get(n)), c.raw(n))
    assert not c.is_conv1d("transformer.wte.weight")


def test_preflight_reads_no_tensor_data(tmp_path):
    """A 10 GB checkpoint whose data section is a sparse hole: opening, planning and inspect work
    from the headers alone, and reading it back is never attempted (the file has no real data)."""
    path = tmp_path / "huge.safetensors"
    n_t, rows, cols = 10, 32768, 8192  # 10 F32 tensors of 1 GiB each
    header = {"__metadata__": {"format": "pt"}}
    off = 0
    for i in range(n_t):
        nbytes = rows * cols * 4
        header[f"model.layers.{i}.mlp.up_proj.weight"] = {
            "dtype": "F32",
            "shape": [rows, cols],
            "data_offsets": [off, off + nbytes],
        }
        off += nbytes
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + off)
    assert path.stat().st_size > 10 * 10**9
    assert os.stat(path).st_blocks * 512 < 1 << 20  # sparse: almost nothing on disk

    from surgery.api import inspect

    info = inspect(str(path))
    assert info["num_params"] == n_t * rows * cols
    assert info["num_bytes"] == off
    # The header parser itself reads only the first 8 + N bytes.
    meta, infos = read_header(path)
    assert len(infos) == n_t


def test_truncated_and_corrupt_files(tmp_path):
    good = demo.tiny_llama(tmp_path / "m") / "model.safetensors"
    data = good.read_bytes()
    cases = {
        "short.safetensors": data[:5],
        "trunc.safetensors": data[: len(data) // 2],
        "absurd.safetensors": struct.pack("<Q", 10**15) + b"{}",
        "garbage.safetensors": struct.pack("<Q", 4) + b"}{!x",
    }
    for name, blob in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(SurgeryError) as e:
            Checkpoint.open(p)
        assert name in str(e.value)


def test_pickles_refused_without_opening(tmp_path):
    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        p = tmp_path / f"model{suffix}"
        p.write_bytes(b"not even a pickle")
        with pytest.raises(SurgeryError, match="pickle checkpoint.*safetensors"):
            Checkpoint.open(p)
    d = tmp_path / "binonly"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(SurgeryError, match="pytorch_model.bin is a pickle"):
        Checkpoint.open(d)


def test_missing_path_and_broken_index(tmp_path):
    with pytest.raises(SurgeryError, match="no such file or folder"):
        Checkpoint.open(tmp_path / "nope")
    d = demo.tiny_llama(tmp_path / "s", shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SurgeryError, match="missing"):
        Checkpoint.open(d)


def test_writer_layout_index_and_determinism(tmp_path):
    src = Checkpoint.open(demo.tiny_llama(tmp_path / "m", int_buffer=True))
    entries = [Entry(n, src.dtype(n), src.info(n).shape) for n in src.names()]

    def write(folder: Path, order: list[str]) -> None:
        folder.mkdir()
        w = ShardWriter(folder, entries, shard_size=8000)
        for n in order:
            w.write(n, src.raw(n))
        w.close()

    write(tmp_path / "a", src.names())
    write(tmp_path / "b", list(reversed(src.names())))  # completion order must not matter
    fa = sorted((tmp_path / "a").iterdir())
    fb = sorted((tmp_path / "b").iterdir())
    assert [f.name for f in fa] == [f.name for f in fb]
    assert len([f for f in fa if f.suffix == ".safetensors"]) > 1
    for x, y in zip(fa, fb):
        assert x.read_bytes() == y.read_bytes()
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src.names())
    assert index["metadata"]["total_size"] == src.nbytes
    out = _all(tmp_path / "a")
    for n in src.names():
        assert torch.equal(out[n], src.raw(n))
    # Written files are valid safetensors with format metadata.
    from safetensors import safe_open

    with safe_open(str(fa[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_writer_single_file_when_it_fits(tmp_path):
    src = Checkpoint.open(demo.tiny_llama(tmp_path / "m"))
    (tmp_path / "o").mkdir()
    w = ShardWriter(
        tmp_path / "o", [Entry(n, src.dtype(n), src.info(n).shape) for n in src.names()]
    )
    for n in src.names():
        w.write_bytes(n, src.read_bytes(n))
    w.close()
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["model.safetensors"]
    # Copy-through is byte-identical tensor by tensor.
    dst = Checkpoint.open(tmp_path / "o")
    for n in src.names():
        assert b"".join(dst.read_bytes(n)) == b"".join(src.read_bytes(n))


def test_writer_rejects_wrong_dtype_or_shape(tmp_path):
    (tmp_path / "o").mkdir()
    w = ShardWriter(tmp_path / "o", [Entry("a", "BF16", (2, 3))])
    with pytest.raises(SurgeryError, match="planned as BF16"):
        w.write("a", torch.zeros(2, 3))
    with pytest.raises(SurgeryError, match="never written"):
        w.close()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size(123) == 123
    with pytest.raises(SurgeryError):
        parse_size("lots")


def test_output_dir_refuses_existing_and_is_atomic(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SurgeryError, match="already exists.*--force"):
        OutputDir(out)
    with pytest.raises(RuntimeError):
        with OutputDir(tmp_path / "new") as od:
            (od.tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()
    assert not any(p.name.startswith(".new.") for p in tmp_path.iterdir())
    with OutputDir(out, force=True) as od:
        (od.tmp / "f").write_text("new")
        od.commit()
    assert (out / "f").read_text() == "new"


def test_killed_run_leaves_no_output(tmp_path):
    """SIGKILL a run mid-way: OUT never appears (only a temp folder beside it)."""
    src = demo.tiny_llama(tmp_path / "m", layers=4)
    out = tmp_path / "out"
    flag = tmp_path / "started"
    script = textwrap.dedent(f"""
        import functools, time
        from pathlib import Path
        from surgery.checkpoint import Checkpoint
        from surgery.manifest import Manifest
        from surgery.run import RunOptions, TensorResult, execute
        from surgery.targets import select

        def task(ckpt, name):
            Path({str(flag)!r}).write_text("x")
            time.sleep(0.5)
            return TensorResult(name, tensor=ckpt.raw(name))

        c = Checkpoint.open({str(src)!r})
        opts = RunOptions.of(dict(out={str(out)!r}))
        execute(opts.job("copy", Manifest("copy"), select(c), functools.partial(task, c),
                         template=c))
    """)
    p = subprocess.Popen([sys.executable, "-c", script])
    for _ in range(200):
        if flag.exists():
            break
        if p.poll() is not None:
            break
        import time

        time.sleep(0.05)
    assert flag.exists(), "the run never started"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()


def test_save_file_compat_roundtrip(tmp_path):
    """Files written by the safetensors library itself are read identically."""
    t = {
        "x": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "i": torch.tensor([1, 2], dtype=torch.int64),
    }
    save_file(t, str(tmp_path / "m.safetensors"))
    c = Checkpoint.open(tmp_path / "m.safetensors")
    assert torch.equal(c.raw("x"), t["x"]) and torch.equal(c.raw("i"), t["i"])
    assert not c.info("i").computable


def test_bf16_casts_match_torch_bit_for_bit():
    """numpy bf16 widening/narrowing (no torch on the data path) equals torch's conversions."""
    import numpy as np

    from ops.backend import bf16_to_f32, f32_to_bf16

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array(
        [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 3.3895314e38, -3.3895314e38, np.finfo("f4").max,
         1e-40, -1e-40, np.finfo("f4").tiny, 1.00390625, 1.01171875, 1.0078125],  # ties both ways
        dtype=np.float32,
    )  # fmt: skip
    x = np.concatenate([bits.view(np.float32), special])
    ours = f32_to_bf16(x)  # NaNs included: torch writes 0xFFFF for each, and so must we
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, ref)
    back = bf16_to_f32(ours)
    assert np.array_equal(back.view(np.uint32), torch.from_numpy(ours.view(np.int16)).view(
        torch.bfloat16).float().numpy().view(np.uint32))  # fmt: skip
    assert np.array_equal(f32_to_bf16(back), ours)  # idempotent
    assert np.isnan(x).sum() > 10  # the random bits did include NaN payloads
    nan = f32_to_bf16(np.array([np.nan, -np.nan], dtype=np.float32))
    assert np.isnan(bf16_to_f32(nan)).all() and (nan == 0xFFFF).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_numpy_array_path_equals_torch_path(tmp_path, dtype):
    import numpy as np

    from surgery.run import load, store

    for d in (demo.tiny_llama(tmp_path / "l", dtype=dtype, int_buffer=True),
              demo.tiny_gpt2(tmp_path / "g", dtype=dtype)):  # fmt: skip
        c = Checkpoint.open(d)
        for n in c.names():
            a, t = c.array(n), c.get(n)
            if dtype == "bfloat16" and c.dtype(n) == "BF16":
                assert np.array_equal(a, t.view(torch.int16).numpy().view(np.uint16)), n
            else:
                assert np.array_equal(a, t.numpy()), n
            if not c.info(n).computable:
                continue
            w = load(c, n)
            assert w.dtype == np.float32 and np.array_equal(w, t.float().numpy()), n
            s = store(c, n, w * 1.5, c.dtype(n))
            ref = c.to_stored(n, (torch.from_numpy(w) * 1.5).to(t.dtype))
            if c.dtype(n) == "BF16":
                ref = ref.view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(s, ref.numpy() if hasattr(ref, "numpy") else ref), n


def test_writer_takes_numpy_and_bf16_bits(tmp_path):
    import numpy as np

    (tmp_path / "o").mkdir()
    ents = [Entry("a", "BF16", (2, 3)), Entry("b", "F16", (3,)), Entry("c", "F32", (2,))]
    w = ShardWriter(tmp_path / "o", ents)
    w.write("a", np.arange(6, dtype=np.uint16).reshape(2, 3) + 0x3F80)
    w.write("b", np.array([1, 2, 3], dtype=np.float16))
    with pytest.raises(SurgeryError, match="planned as F32"):
        w.write("c", np.zeros(2, dtype=np.float64))
    w.write("c", np.zeros(2, dtype=np.float32))
    w.close()
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert got["a"].dtype == torch.bfloat16 and got["a"][0, 0].item() == 1.0
    assert got["b"].tolist() == [1, 2, 3]


def test_numpy_verbs_never_import_torch(tmp_path):
    """extract, PiSSA/KaSA/CorDA (--stats), merges, probe edits and the adapter verbs (apply, port,
    convert) run on numpy: no torch import."""
    base = demo.tiny_llama(tmp_path / "b", dtype="bfloat16")
    tuned = demo.tiny_llama(tmp_path / "t", dtype="bfloat16", seed=1)
    probe = tmp_path / "probe.safetensors"
    save_file({"probe": torch.randn(2, 32).to(torch.bfloat16)}, str(probe))
    from surgery.stats import write_stats

    ck = Checkpoint.open(base)
    lin = [n[: -len(".weight")] for n in ck.names() if n.endswith("_proj.weight")]
    covs = {}
    for m in lin:
        x = torch.randn(64, ck.shape(m + ".weight")[1])
        covs[m + ".cov"] = x.T @ x
    stats = write_stats(tmp_path / "stats.safetensors", covs, convention="max")
    b, t = str(base), str(tuned)
    runs = [
        ["extract", b, t, "-r", "4", "-o", str(tmp_path / "e")],
        ["decompose", b, "-m", "pissa", "-r", "4", "-o", str(tmp_path / "p")],
        ["decompose", b, "-m", "kasa", "-r", "4", "-o", str(tmp_path / "k")],
        [
            "decompose",
            b,
            "-m",
            "corda",
            "-r",
            "4",
            "--stats",
            str(stats),
            "-o",
            str(tmp_path / "c"),
        ],
        ["merge", t, "--base", b, "--method", "ties", "-o", str(tmp_path / "m")],
        ["edit", b, "-m", "probe", "--probe", str(probe), "-o", str(tmp_path / "x")],
        ["apply", b, str(tmp_path / "e"), "-o", str(tmp_path / "a")],
        ["port", str(tmp_path / "e"), "--to", t, "--from", b, "-o", str(tmp_path / "po")],
        ["convert", str(tmp_path / "k" / "adapter"), "--base", b, "-o", str(tmp_path / "cv")],
    ]
    code = textwrap.dedent(f"""
        import sys
        from cli import cli
        for i, argv in enumerate({runs!r}):
            try:
                cli(argv + ["-q"], standalone_mode=False)
            except SystemExit as e:
                assert not e.code, e
            if i == 1:  # extract and PiSSA need no scipy either (0.25 s)
                assert "scipy" not in sys.modules, "scipy was imported"
        assert "torch" not in sys.modules, "torch was imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
