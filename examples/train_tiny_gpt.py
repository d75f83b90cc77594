"""Train a tiny character-level GPT twice, with flashcupy attention and with PyTorch SDPA.

Both runs start from the same seed (same initial weights, same batches, same
order); only the attention function differs.  The script prints both loss
curves side by side, the largest difference between them, the mean step time
of each run, and a sample of text from the flashcupy model.  It exits with
status 1 if the curves differ by more than ``--tol`` anywhere (compared as
10-step running means: two bf16 runs drift apart chaotically, so single steps
can differ by a few hundredths while the curves agree; a wrong mask or a wrong
gradient moves them apart by tenths within a hundred steps).

The text is generated here, procedurally (nothing is downloaded): short
English-like sentences from a small grammar, additions written out with their
results, and counting runs, so that a char-level model has structure to learn.

    python examples/train_tiny_gpt.py                     # 300 steps on cuda:0
    python examples/train_tiny_gpt.py --steps 100 --device cuda:1
    python examples/train_tiny_gpt.py --impls sdpa,math --device cpu --steps 30 \\
        --batch 4 --seq 64          # a GPU-free smoke test of the script itself

Default model: d_model 256, 4 layers, 4 heads (head dim 64), context 256,
batch 32, bf16 autocast, AdamW with warmup and cosine decay.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# data: a procedural corpus
# ----------------------------------------------------------------------------

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird",
            "the teacher", "our neighbor", "the farmer", "a young girl"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "helps", "watches", "builds",
         "carries", "remembers"]
OBJECTS = ["the river", "a red ball", "the green house", "two apples", "the moon",
           "a wooden boat", "the city", "three stones", "the long road", "a blue kite"]
ENDINGS = ["today", "slowly", "at night", "in the garden", "again", "with care",
           "before dinner", "near the sea"]


def _sentence(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.6:
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        if rng.random() < 0.7:
            s += " " + rng.choice(ENDINGS)
        return s[0].upper() + s[1:] + "."
    if r < 0.85:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a} plus {b} is {a + b}."
    start = rng.randrange(90)
    return "Count: " + " ".join(str(i) for i in range(start, start + rng.randrange(3, 9))) + "."


def make_corpus(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    parts, n = [], 0
    while n < n_chars:
        para = " ".join(_sentence(rng) for _ in range(rng.randrange(3, 7))) + "\n"
        parts.append(para)
        n += len(para)
    return "".join(parts)[:n_chars]


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------

def math_attention(q, k, v):
    """Causal attention written out in PyTorch ops (a third reference, CPU-friendly)."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    n = s.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


def get_attention(name: str):
    """(q, k, v) of shape (B, H, S, Dh) -> (B, H, S, Dh), causal."""
    if name == "flashcupy":
        import flashcupy.torch as fct
        return lambda q, k, v: fct.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name == "math":
        return math_attention
    raise ValueError(f"unknown attention implementation {name!r}; use flashcupy, sdpa or math")


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, attn):
        super().__init__()
        self.n_heads, self.attn = n_heads, attn
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        B, S, C = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, S, 3, self.n_heads, C // self.n_heads)
        # (B, S, H, Dh) slices seen as (B, H, S, Dh): strided views, no copies;
        # flashcupy reads them in place
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        y = self.attn(q, k, v).transpose(1, 2).reshape(B, S, C)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d_model: int, n_layers: int, n_heads: int, attn):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, attn) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied embeddings
        self.apply(self._init)
        for b in self.blocks:  # GPT-2's scaled init of the residual projections
            nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------

def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def running_mean(xs, w: int):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return out


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(impl: str, data: torch.Tensor, vocab: int, args, device: torch.device):
    """Returns (losses per step, mean step time in ms after warm-up, model)."""
    attn = get_attention(impl)
    torch.manual_seed(args.seed)  # same initial weights for every implementation
    model = TinyGPT(vocab, args.seq, args.d_model, args.layers, args.heads, attn).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.1, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed + 1)  # same batches, same order
    warmup_steps = min(10, args.steps // 2)  # excluded from the timing (kernel compiles)
    losses = []
    t0 = None
    for step in range(args.steps):
        if step == warmup_steps:
            sync(device)
            t0 = time.perf_counter()
        starts = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=gen)
        idx = torch.stack([data[s:s + args.seq + 1] for s in starts.tolist()])
        idx = idx.to(device, non_blocking=True)
        x, y = idx[:, :-1], idx[:, 1:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
    sync(device)
    n_timed = args.steps - warmup_steps
    step_ms = (time.perf_counter() - t0) * 1e3 / n_timed if n_timed > 0 else float("nan")
    return [float(x) for x in torch.stack(losses).cpu()], step_ms, model


@torch.no_grad()
def sample(model, stoi, itos, prompt: str, n: int, seq: int, device, seed: int) -> str:
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([[stoi[c] for c in prompt]], device=device)
    model.eval()
    for _ in range(n):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            logits = model(idx[:, -seq:])[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1, generator=gen)
        idx = torch.cat([idx, nxt], dim=1)
    model.train()
    return "".join(itos[i] for i in idx[0].tolist())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, ... (cpu only with --impls sdpa,math)")
    p.add_argument("--impls", default="flashcupy,sdpa",
                   help="two attention implementations to compare: flashcupy, sdpa, math")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-chars", type=int, default=2_000_000)
    p.add_argument("--log-every", type=int, default=0, help="table row interval (default: ~20 rows)")
    p.add_argument("--tol", type=float, default=0.1,
                   help="largest allowed difference of the loss running means (exit 1 beyond)")
    p.add_argument("--smooth", type=int, default=10, help="running-mean window (steps)")
    p.add_argument("--sample", type=int, default=200, help="characters to sample at the end (0: none)")
    args = p.parse_args(argv)

    impls = [s.strip() for s in args.impls.split(",")]
    if len(impls) != 2:
        p.error("--impls takes exactly two names, e.g. flashcupy,sdpa")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("no CUDA device visible; see --device")
        if device.index is not None:
            torch.cuda.set_device(device)

    text = make_corpus(args.corpus_chars, args.seed)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    itos = {i: c for c, i in stoi.items()}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    vocab = len(chars)

    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)} ({device}); torch {torch.__version__}")
    else:
        print(f"device: {device}; torch {torch.__version__}")
    print(f"corpus: {len(text):,} generated chars, vocab {vocab}; model: d_model {args.d_model}, "
          f"{args.layers} layers, {args.heads} heads, context {args.seq}, batch {args.batch}, "
          f"bf16 autocast, {args.steps} steps, seed {args.seed}")

    results = {}
    for impl in impls:
        print(f"training with {impl} attention ...", flush=True)
        results[impl] = train(impl, data, vocab, args, device)

    (a, (la, ta, model_a)), (b, (lb, tb, _)) = results.items()
    every = args.log_every or max(1, args.steps // 20)
    w = max(len(a), len(b), 9)
    print(f"\n{'step':>6}  {a:>{w}}  {b:>{w}}  {'|diff|':>9}")
    for i in range(0, args.steps, every):
        print(f"{i:>6}  {la[i]:>{w}.4f}  {lb[i]:>{w}.4f}  {abs(la[i] - lb[i]):>9.2e}")
    if (args.steps - 1) % every:
        i = args.steps - 1
        print(f"{i:>6}  {la[i]:>{w}.4f}  {lb[i]:>{w}.4f}  {abs(la[i] - lb[i]):>9.2e}")
    diffs = [abs(x - y) for x, y in zip(la, lb)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    # the check uses running means: two bf16 runs drift apart chaotically, and a
    # drop in the loss that comes a step earlier in one run gives a one-step spike
    sdiffs = [abs(x - y) for x, y in zip(running_mean(la, args.smooth),
                                          running_mean(lb, args.smooth))]
    sworst = max(range(len(sdiffs)), key=sdiffs.__getitem__)
    tail = max(1, args.steps // 10)
    print(f"\nmax |loss difference|: {diffs[worst]:.4e} at step {worst}")
    print(f"max |difference of {args.smooth}-step running means|: {sdiffs[sworst]:.4e} at step "
          f"{sworst} (tolerance {args.tol})")
    print(f"mean loss over the last {tail} steps: {a} {sum(la[-tail:]) / tail:.4f}, "
          f"{b} {sum(lb[-tail:]) / tail:.4f}")
    print(f"mean step time (after warm-up): {a} {ta:.2f} ms, {b} {tb:.2f} ms "
          f"({a}/{b} = {ta / tb:.2f}x)")

    if args.sample > 0:
        print(f"\nsample from the {a} model:\n"
              + sample(model_a, stoi, itos, "The ", args.sample, args.seq, device, args.seed))

    if not all(math.isfinite(x) for x in la + lb):
        print("FAIL: non-finite loss", file=sys.stderr)
        return 1
    if sdiffs[sworst] > args.tol:
        print(f"FAIL: loss curves diverge: running means differ by {sdiffs[sworst]:.4e} > "
              f"tolerance {args.tol}", file=sys.stderr)
        return 1
    print("OK: the loss curves agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
