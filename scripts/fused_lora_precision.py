"""How far bf16-autocast LoRA gradients are from float32 ones, with the fused LoRA layer and with peft's forward.

    python scripts/fused_lora_precision.py            # SmolLM2-135M-Instruct (embedded), 2 x 128 random tokens

One forward and backward pass of the same model and batch: in float32 (peft's forward), and under bf16 autocast with
`peft.fused=true` and `false`. LoRA B is drawn from N(0, 0.01) (it starts at zero in training) so that every gradient
is non-trivial; no dropout. Prints the losses and each bf16 gradient's relative distance (in norm) to float32's.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from ftune.models.loading import resolve_model_dir
from ftune.peft.lora import LoRA


def build(model_dir, fused: bool):
    torch.manual_seed(0)
    model = LoRA(dropout=0.0, fused=fused).apply(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return model.train()


def loss_and_grads(model, ids, bf16: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct",
                   help="a model name ftune resolves, or a directory")
    p.add_argument("--tokens", type=int, default=128)
    a = p.parse_args()
    model_dir = resolve_model_dir(a.model)
    fused, plain = build(model_dir, True), build(model_dir, False)
    vocab = plain.config.vocab_size
    ids = torch.randint(0, vocab, (2, a.tokens), generator=torch.Generator().manual_seed(1))
    l32, g32 = loss_and_grads(plain, ids, bf16=False)
    lf, gf = loss_and_grads(fused, ids, bf16=True)
    lp, gp = loss_and_grads(plain, ids, bf16=True)
    print(f"loss: float32 {l32:.6f}, bf16 fused {lf:.6f}, bf16 peft {lp:.6f}")
    print(f"LoRA gradients, relative distance to float32: fused {float((gf - g32).norm() / g32.norm()):.4f}, "
          f"peft {float((gp - g32).norm() / g32.norm()):.4f}")


if __name__ == "__main__":
    main()
