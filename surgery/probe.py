"""``surgery probe``: train Model Surgery's behaviour probe on labelled text (extra ``calib``).

As in the released code (ALGORITHMS.md §5.1): the frozen model's **final hidden state** (the
output of the last layer after the final norm, HF ``hidden_states[-1]``), **mean-pooled over
non-pad tokens**, feeds a linear classifier ``nn.Linear(hidden, classes)`` trained with
log-softmax + NLL and Adam (lr 1e-4, batch 16, 20 epochs by default). The probe file holds
``probe`` ``[classes, hidden]`` (the classifier weight; the bias is saved as ``bias`` and ignored
by the edit) so ``surgery edit --probe FILE -p probe_row=1`` takes the positive ("toxic") class row.

Deviation: padding is masked with the attention mask rather than by ``pad id == 0``, so a real
token with id 0 is not dropped.

Reference: https://arxiv.org/abs/2407.08770 (lucywang720/model-surgery)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import SurgeryError

__all__ = ["train_probe", "probe_features", "read_labels", "probe_accuracy"]

log = logging.getLogger("surgery")


def read_labels(path: str | os.PathLike[str], key: str = "label") -> dict[int, int]:
    """Read the integer class label of every non-blank JSONL line, keyed by 1-based line number.

    Raises:
        SurgeryError: listing every line whose label is missing or not an integer ``>= 0``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise SurgeryError(f"{p}: no such data file (expected a labelled .jsonl file)")
    labels: dict[int, int] = {}
    problems: list[str] = []
    with open(p, "rb") as f:
        for no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                continue  # read_calib reports malformed lines with their column
            lab = obj.get(key) if isinstance(obj, dict) else None
            # bool is an int subclass: true/false map to 1/0 (Jigsaw-style "any toxicity").
            if isinstance(lab, bool):
                lab = int(lab)
            if not isinstance(lab, int) or lab < 0:
                problems.append(
                    f"{p.name}:{no}: {key!r} must be a class index 0, 1, … (got {lab!r})"
                )
                continue
            labels[no] = lab
    if problems:
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SurgeryError(
            f"{p}: {len(problems)} line(s) without a usable label:\n  "
            + "\n  ".join(problems[:20])
            + more
        )
    return labels


def probe_features(model: Any, samples: list, *, batch_size: int = 16, device: str = "cpu"):
    """Mean-pooled final hidden states ``[n, hidden]`` (float32) of ``samples`` (token ids).

    Args:
        model: a transformers model (``…ForCausalLM`` or a bare base model).
        samples: ``surgery.calibrate.Sample`` records (``.ids``).
        batch_size: samples per forward (the result does not depend on it, up to round-off).
        device: torch device of the model.
    """
    import torch

    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    run = base if base is not None else model  # skip the vocab-sized head
    feats = []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            n = max(len(s.ids) for s in chunk)
            # Right padding: causal positions of real tokens are unchanged.
            ids = torch.zeros((len(chunk), n), dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, : len(s.ids)] = torch.tensor(s.ids)
                mask[j, : len(s.ids)] = 1
            out = run(input_ids=ids.to(device), attention_mask=mask.to(device))
            h = out.last_hidden_state.float()  # [b, n, hidden], after the final norm
            m = mask.to(h.device, h.dtype)[..., None]
            feats.append(((h * m).sum(1) / m.sum(1)).cpu())  # [b, hidden]
    return torch.cat(feats)


def train_probe(
    src: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str],
    epochs: int = 20,
    lr: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    samples: int | None = None,
    seq_len: int | None = None,
    label_key: str = "label",
    tokenizer: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    device: str | None = None,
    force: bool = False,
) -> Path:
    """Train a linear behaviour probe on labelled JSONL and save it as safetensors.

    Args:
        src: checkpoint with config.json (and tokenizer files unless lines carry ``input_ids``).
        data: JSONL; each line has ``text``/``messages``/``prompt``/``input_ids`` and ``label``
            (class index; ``true``/``false`` allowed).
        out: the ``.safetensors`` file to write.
        epochs, lr, batch_size: Adam training settings (released defaults 20, 1e-4, 16).
        seed: seeds the classifier init and the shuffling.
        samples, seq_len: use the first N lines / truncate to L tokens.
        label_key: the JSON field holding the label.
        tokenizer: tokenizer folder (default: the checkpoint folder).
        config: config.json when the checkpoint has none.
        device: ``auto``, ``cpu`` or ``cuda``.
        force: overwrite an existing ``out``.

    Returns:
        The probe file path. Its metadata records the classes, sample count and train accuracy.

    Raises:
        SurgeryError: bad data or labels (all listed), fewer than two classes, existing output.
    """
    import torch
    from safetensors.torch import save_file

    from .calibrate import _torch_device, build_model, load_tokenizer, read_calib

    out = Path(out)
    if out.suffix != ".safetensors":
        raise SurgeryError(f"-o {out}: the probe is written as a .safetensors file")
    if out.exists() and not force:
        raise SurgeryError(f"{out} exists; pass --force to replace it")
    for name, v in (("--epochs", epochs), ("--batch-size", batch_size)):
        if v < 1:
            raise SurgeryError(f"{name} must be >= 1, got {v}")
    if not lr > 0:
        raise SurgeryError(f"--lr must be > 0, got {lr}")
    ckpt = Checkpoint.open(src)
    labels = read_labels(data, label_key)
    vocab = ckpt.config.get("vocab_size")
    recs = read_calib(
        data,
        tokenizer_loader=lambda: load_tokenizer(tokenizer or ckpt.root),
        samples=samples,
        seq_len=seq_len,
        vocab_size=vocab if isinstance(vocab, int) else None,
    )
    y = torch.tensor([labels[s.line] for s in recs])
    classes = max(2, int(y.max()) + 1)
    present = sorted(set(y.tolist()))
    if len(present) < 2:
        raise SurgeryError(
            f"{data}: every sample has label {present[0]}; a probe needs two classes"
        )
    dev = _torch_device(device)
    model, _ = build_model(ckpt, config=config, device=dev)
    x = probe_features(model, recs, batch_size=batch_size, device=dev)  # [n, hidden] fp32
    del model

    # The released recipe: Linear(hidden, classes), log-softmax + NLL, Adam; features are frozen.
    torch.manual_seed(seed)
    clf = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            loss = torch.nn.functional.nll_loss(torch.log_softmax(clf(x[idx]), -1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((clf(x).argmax(-1) == y).float().mean())
    w = clf.weight.detach().contiguous()  # [classes, hidden]
    meta = {
        "format": "pt",
        "classes": json.dumps(list(range(classes))),
        "samples": str(len(y)),
        "train_accuracy": f"{acc:.6f}",
        "features": "final hidden state (after the final norm), mean over non-pad tokens",
        "source": str(ckpt.source),
        "recipe": json.dumps({"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"probe": w, "bias": clf.bias.detach().contiguous()}, str(out), metadata=meta)
    log.info("probe: %d samples, %d classes, train accuracy %.3f", len(y), classes, acc)
    return out


def probe_accuracy(path: str | os.PathLike[str]) -> float:
    """The train accuracy recorded in a probe file's metadata (``nan`` when absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return float((f.metadata() or {}).get("train_accuracy", "nan"))
