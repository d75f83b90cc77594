"""Train a tiny Hugging Face Llama with flashcupy attention, and with a baseline.

The model is built from a ``LlamaConfig`` (randomly initialized, nothing is
downloaded) and trained for a few steps on random tokens, once with a
transformers attention implementation (``sdpa`` by default, or ``eager``) and
once with flashcupy's, registered by ``flashcupy.hf.register_transformers()``.
Both runs start from the same weights and see the same batches; the script
prints the loss every few steps and the median step time of each run.  On
random tokens the loss can only fall toward log(vocab); the point is that the
two curves agree and how long a step takes.

    python examples/hf_model.py                        # sdpa vs flashcupy
    python examples/hf_model.py --baseline eager --steps 10 --seq 2048

Default model: hidden 512, 4 layers, 8 query heads on 2 kv heads (GQA, head
dim 64), sequence 1024, batch 4, bf16 autocast, AdamW.  Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="sdpa", choices=["sdpa", "eager"],
                   help="the transformers attention implementation to compare with")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def train(model, batches, args, label: str) -> tuple[list, list]:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses, times = [], []
    for step, ids in enumerate(batches, 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % args.log_every == 0 or step == 1:
            print(f"  [{label:>14}] step {step:3d}  loss {losses[-1]:.4f}  "
                  f"{times[-1] * 1e3:7.1f} ms")
    return losses, times


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError as e:
        sys.exit(f"examples/hf_model.py needs torch and transformers: {e}")
    if not torch.cuda.is_available():
        sys.exit("examples/hf_model.py needs a CUDA GPU: torch.cuda.is_available() is False")

    from flashcupy.hf import register_transformers

    name = register_transformers()
    device = torch.device(args.device)
    if device.index is None:  # torch.cuda.set_device wants an index
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq)

    torch.manual_seed(0)
    init = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                         attn_implementation="eager").state_dict()
    g = torch.Generator(device).manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), device=device, generator=g)
               for _ in range(args.steps)]
    n_params = sum(v.numel() for v in init.values())
    print(f"Llama: {n_params / 1e6:.1f}M parameters, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads / {args.kv_heads} kv heads, batch {args.batch} x seq {args.seq}, "
          f"bf16 autocast, {args.steps} steps on {torch.cuda.get_device_name(device)}")

    results = {}
    for impl in (args.baseline, name):
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                              attn_implementation=impl)
        model.load_state_dict(init)
        model.to(device).train()
        print(f"attn_implementation={impl!r}")
        results[impl] = train(model, batches, args, impl)
        del model
        torch.cuda.empty_cache()

    (lb, tb), (lf, tf) = results[args.baseline], results[name]
    # the first steps compile kernels and warm caches: the median skips them
    skip = min(3, max(len(tb) - 1, 0))
    mb, mf = statistics.median(tb[skip:]), statistics.median(tf[skip:])
    diff = max(abs(a - b) for a, b in zip(lb, lf))
    print(f"median step time: {args.baseline} {mb * 1e3:.1f} ms, {name} {mf * 1e3:.1f} ms "
          f"({mb / mf:.2f}x)")
    print(f"largest loss difference between the runs: {diff:.4f} "
          f"(final loss {lb[-1]:.4f} vs {lf[-1]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
