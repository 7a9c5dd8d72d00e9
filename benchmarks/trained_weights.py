"""Trained weights for the benchmarks: the llm-offload example's GPT after a few rounds.

Writes a directory that ``ftx-bench e2e --weights DIR`` (and the quickstart app's
``weights-dir`` run-config key) reads:

* ``base.npy``: the global model after ``--rounds`` rounds of the example's local
  training (each round ``--steps`` AdamW steps at ``--lr``, batch 4 x 128 tokens of its
  synthetic language, a fresh optimizer each round, as its ClientApp does), fp32 master
  weights, every array flattened and concatenated in ``index.json``'s order;
* ``update-K.npy``: client K's change after ONE more round from ``base`` (its own data
  seed): trained_K - base, fp32, same layout. A benchmark client replies
  ``received + update-K``, so the bytes it sends are those of a real round's update;
* ``index.json``: names, shapes, offsets, the settings and the training losses.

The default preset ``125m`` is 124.5 M parameters, 475 MiB in fp32. On this 2-core
machine a step takes ~3.5 s: the defaults take about a minute.

    python benchmarks/trained_weights.py --out ~/.cache/ftx-bench/trained-125m
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FORMAT = 1


def _settings(a: argparse.Namespace) -> dict:
    return {"format": FORMAT, "preset": a.preset, "rounds": a.rounds, "steps": a.steps,
            "lr": a.lr, "batch": 4, "seq": 128, "clients": a.clients, "seed": a.seed}


def is_ready(out: Path, settings: dict) -> bool:
    """``out`` holds a complete set written with ``settings``."""
    try:
        idx = json.loads((out / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if idx.get("settings") != settings:
        return False
    files = ["base.npy"] + [f"update-{k}.npy" for k in range(settings["clients"])]
    return all((out / f).is_file() for f in files)


def _flat(state: dict, names: list[str]) -> np.ndarray:
    return np.concatenate([state[n].detach().to("cpu").float().numpy().reshape(-1)
                           for n in names])


def _save(path: Path, vec: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, vec, allow_pickle=False)
    os.replace(tmp, path)


def train(a: argparse.Namespace, out: Path, log=print) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "examples" / "llm-offload"))
    from llm_offload.data import Language
    from llm_offload.model import empty_model
    from llm_offload.model import preset as get_preset

    torch.manual_seed(a.seed)
    cfg = get_preset(a.preset)
    model = empty_model(cfg).init_weights(a.seed)
    lang = Language(cfg.vocab_size, min(512, cfg.vocab_size), seed=a.seed)

    def one_round(m, tag) -> list[float]:
        opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.0)
        losses = []
        for step in range(a.steps):
            x, y = lang.batch(4, 128, seed=zlib.crc32(repr((*tag, step)).encode()))
            loss = m(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(float(loss.detach()), 4))
        return losses

    t0 = time.perf_counter()
    losses: dict[str, list[float]] = {"pretrain": []}
    for rnd in range(a.rounds):
        losses["pretrain"] += one_round(model, ("base", rnd))
        log(f"round {rnd + 1}/{a.rounds}: loss {losses['pretrain'][-1]:.4f} "
            f"({time.perf_counter() - t0:.0f} s)")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = list(base_state)
    shapes = {n: list(base_state[n].shape) for n in names}
    base = _flat(base_state, names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # incomplete until written last
    _save(out / "base.npy", base)
    for k in range(a.clients):
        model.load_state_dict(base_state)
        losses[f"client-{k}"] = one_round(model, ("client", k))
        upd = _flat(model.state_dict(), names) - base
        _save(out / f"update-{k}.npy", upd)
        log(f"client {k}: loss {losses[f'client-{k}'][-1]:.4f}, "
            f"update |mean| {float(np.abs(upd).mean()):.3g} ({time.perf_counter() - t0:.0f} s)")
    offsets, off = {}, 0
    for n in names:
        size = int(np.prod(shapes[n], dtype=np.int64))
        offsets[n] = [off, size]
        off += size
    idx = {"settings": _settings(a), "names": names, "shapes": shapes, "offsets": offsets,
           "dtype": "float32", "elements": off, "losses": losses,
           "seconds": round(time.perf_counter() - t0, 1)}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(idx, indent=1), encoding="utf-8")
    os.replace(tmp, out / "index.json")
    return idx


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="125m", help="llm-offload model-size (default 125m)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds before the base (default 5)")
    ap.add_argument("--steps", type=int, default=2,
                    help="AdamW steps per round (the example's default local-steps: 2)")
    ap.add_argument("--lr", type=float, default=1e-3, help="the example's default lr")
    ap.add_argument("--clients", type=int, default=2, help="one update per client")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="retrain even if --out is complete")
    return ap


def ensure(argv: list[str] | None = None, log=print) -> Path:
    a = parser().parse_args(argv)
    out = a.out.expanduser().resolve()
    if not a.force and is_ready(out, _settings(a)):
        log(f"trained weights already in {out}")
        return out
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("trained weights need torch: pip install torch==2.13.0 "
                         "(CPU wheel; see README)") from None
    train(a, out, log)
    return out


if __name__ == "__main__":
    ensure()
