"""Why ``delta`` cannot reach half of raw on fp32 after a round of AdamW (issue 25).

Trains the llm-offload example's GPT (``--preset``, default tiny) for ``--pretrain``
rounds and then ONE more round (the example's 2 AdamW steps at lr 1e-3, as
benchmarks/codec_bench.py does), and measures on the update of that round:

* the share of elements that did not change (a frozen layer would make it 1);
* the entropy of the low 16 bits (fp32) / low 8 bits (bf16) of each element's change,
  taken as the difference of the elements' ordered bit patterns: bits that are close
  to uniformly random cannot be coded in fewer bits by any lossless coder;
* what byte planes + zstd give for the XOR the ``delta`` codec uses and for that
  integer difference (an alternative transform).

Usage: python benchmarks/delta_bound.py [--preset tiny] [--pretrain 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_bench import train_example, uptime


def _planes(u8: np.ndarray, itemsize: int, level: int = 1) -> int:
    c = zstandard.ZstdCompressor(level=level)
    m = u8.reshape(-1, itemsize)
    return sum(len(c.compress(np.ascontiguousarray(m[:, i]).tobytes())) for i in range(itemsize))


def _entropy_bits(v: np.ndarray) -> float:
    _, counts = np.unique(v, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _ordered(u: np.ndarray, bits: int) -> np.ndarray:
    """Sign-magnitude float bit patterns as integers in value order."""
    s = u.astype(np.int64)
    sign = 1 << (bits - 1)
    return np.where(s & sign, sign - (s & (sign - 1)) - 1, s)


def analyse(x: np.ndarray, y: np.ndarray, dtype: str) -> dict:
    bits, utype, low = (32, np.uint32, 16) if dtype == "fp32" else (16, np.uint16, 8)
    xi, yi = x.view(utype), y.view(utype)
    raw = y.nbytes
    d = _ordered(yi, bits) - _ordered(xi, bits)
    z = ((d << 1) ^ (d >> 63)).astype(np.uint64)  # zigzag: small magnitudes, small codes
    lo = (z & ((1 << low) - 1)).astype(np.uint32)
    return {"dtype": dtype, "elements": int(y.size), "raw_bytes": int(raw),
            "unchanged_share": float(np.mean(xi == yi)),
            f"entropy_low{low}_bits": _entropy_bits(lo),
            "entropy_sample_cap_bits": float(np.log2(y.size)),
            "bound_from_low_bits_alone": low / bits,
            "xor_planes_zstd1_ratio": _planes((xi ^ yi).view(np.uint8), bits // 8) / raw,
            "intdiff_planes_zstd1_ratio": _planes(
                z.astype(utype).view(np.uint8), bits // 8) / raw,
            "lossless_planes_zstd1_ratio": _planes(yi.view(np.uint8), bits // 8) / raw}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--pretrain", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import torch

    before, after, _ = train_example(a.preset, a.pretrain, 2, 1e-3, 4, 128)
    out = {"preset": a.preset, "pretrain_rounds": a.pretrain, "steps": 2, "lr": 1e-3,
           "uptime_before": uptime(), "command": " ".join(sys.argv),
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=False).stdout.strip(), "results": []}
    for dtype, tdt, ndt in (("fp32", torch.float32, np.float32),
                            ("bf16", torch.bfloat16, None)):
        def flat(sd, tdt=tdt, ndt=ndt):
            parts = [v.to(tdt).contiguous() for v in sd.values()]
            if ndt is not None:
                return np.concatenate([p.numpy().ravel() for p in parts])
            return np.concatenate([p.view(torch.int16).numpy().ravel() for p in parts]
                                  ).view(np.uint16)
        out["results"].append(analyse(flat(before), flat(after), dtype))
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
