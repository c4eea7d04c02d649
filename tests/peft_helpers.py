"""Helpers shared by the tests that run the real PEFT and transformers on tiny local models."""

from __future__ import annotations

import torch
import transformers


def load_model(d):
    """The tiny GPT-2 or Llama checkpoint folder ``d`` as an fp32 transformers model (eval)."""
    cls = transformers.GPT2LMHeadModel if "gpt2" in str(d) else transformers.LlamaForCausalLM
    return cls.from_pretrained(str(d), torch_dtype=torch.float32).eval()


def ids(vocab: int = 64) -> torch.Tensor:
    """A fixed ``(2, 9)`` batch of token ids."""
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


def train_adalora(pm, steps: int = 4) -> None:
    """A few SGD steps with AdaLoRA's rank allocator: it prunes triplets and writes a boolean
    ``rank_pattern``, as a real AdaLoRA run would."""
    opt = torch.optim.SGD(pm.parameters(), lr=0.1)
    x = ids()
    for step in range(steps):
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
