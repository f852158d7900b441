"""Training throughput of the library against a bare PyTorch loop, in one run.

For each architecture the library's Trainer and a minimal hand-written loop (its
own model definition, the same sizes, batch and bptt, Adam, hidden state detached
between windows) train on the same corpus; trials alternate so that machine noise
hits both alike. Prints characters/second, medians and the ratio library / bare.

    python bench/throughput.py                         # stateful_gru and stateful_lstm, notebook sizes
    python bench/throughput.py --steps 200 --trials 7
    python bench/throughput.py --precision bf16        # both loops under bf16 autocast

Both loops run one precision (``--precision``, default fp32): the library's ``auto`` would
pick bf16 on a CPU where it measures faster while a bare loop stays in fp32, which measures
the precision, not the library (``bench/precision.py`` does that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import notebook
from charlm.data import read_corpus
from charlm.prepared import prepare_for
from charlm.training import Trainer

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nietzsche.txt"


class BareModel(nn.Module):
    def __init__(self, cell, vocab, emb, hidden, layers, dropout):
        super().__init__()
        self.e = nn.Embedding(vocab, emb)
        self.rnn = cell(emb, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x, h):
        o, h = self.rnn(self.e(x), h)
        return self.out(self.drop(o)), h


def bare_loop(config, corpus, steps, warmup, device):
    """The textbook truncated-BPTT loop; returns characters/second over `steps` steps (under bf16
    autocast when the config's precision is bf16, as the library's forward pass is)."""
    torch.manual_seed(config.seed)
    m, d = config.model, config.data
    mixed = config.precision == "bf16"
    cell = {"stateful_gru": nn.GRU, "stateful_lstm": nn.LSTM, "stateful_rnn": nn.RNN}[m.architecture]
    model = BareModel(cell, len(corpus.vocab), m.embedding_dim, m.hidden_size, m.num_layers, m.dropout).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=config.optim.weight_decay)
    n = corpus.train.numel() // d.batch_size
    data = corpus.train[: n * d.batch_size].view(d.batch_size, n)
    zeros = torch.zeros(m.num_layers, d.batch_size, m.hidden_size, device=device)
    h = (zeros, zeros.clone()) if cell is nn.LSTM else zeros
    i, t0 = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if i + d.context + 1 > n:
            i = 0
        x = data[:, i : i + d.context].long().to(device)
        y = data[:, i + 1 : i + 1 + d.context].long().to(device)
        i += d.context
        h = tuple(s.detach() for s in h) if isinstance(h, tuple) else h.detach()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            logits, h = model(x, h)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * d.batch_size * d.context / (time.perf_counter() - t0)


def library_loop(config, corpus, steps, warmup, device):
    """The library's Trainer for the same number of steps; returns characters/second."""
    trainer = Trainer(config, corpus, device=device)
    trainer.fit(max_steps=warmup)
    t0 = time.perf_counter()
    trainer.fit(max_steps=warmup + steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert trainer.step == warmup + steps, "ran past an epoch end: lower --steps"
    return steps * config.data.batch_size * config.data.context / (time.perf_counter() - t0)


def main() -> None:
    from charlm.device import flush_denormals

    flush_denormals()  # as charlm's CLI and workers do, before torch's thread pool starts
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["stateful_gru", "stateful_lstm"])
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="both loops'")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    text = read_corpus(args.corpus)
    t0 = time.perf_counter()
    reference = prepare_for(notebook("stateful_gru"), text)
    prepare_s = time.perf_counter() - t0
    print(
        f"prepare corpus ({len(text):,} chars, split + vocabulary + encode): {prepare_s:.3f}s; "
        f"train tensor {reference.train.dtype}, {reference.train.numel():,} elements"
    )
    results = {"prepare_seconds": prepare_s, "torch_threads": torch.get_num_threads(), "architectures": {}}
    for arch in args.arch:
        # Fixed bptt so both loops see the same batch shapes; no progress bar.
        config = notebook(arch).override(
            {"data.random_bptt": False, "progress": False, "device": args.device, "precision": args.precision}
        )
        corpus = prepare_for(config, text)
        device = Trainer(config, corpus).device
        lib, bare = [], []
        for _ in range(args.trials):
            lib.append(library_loop(config, corpus, args.steps, args.warmup, device))
            bare.append(bare_loop(config, corpus, args.steps, args.warmup, device))
        ratio = statistics.median(lib) / statistics.median(bare)
        ratios = [a / b for a, b in zip(lib, bare)]
        print(
            f"{arch} on {device}, {args.precision} (batch {config.data.batch_size}, bptt {config.data.context}, "
            f"hidden {config.model.hidden_size}x{config.model.num_layers}): "
            f"library {statistics.median(lib):,.0f} chars/s, bare {statistics.median(bare):,.0f} chars/s, "
            f"ratio of medians {ratio:.3f} (per-trial ratios {', '.join(f'{r:.3f}' for r in ratios)})"
        )
        results["architectures"][arch] = {
            "device": str(device),
            "precision": args.precision,
            "library_chars_per_sec": lib,
            "bare_chars_per_sec": bare,
            "ratio_of_medians": ratio,
        }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
