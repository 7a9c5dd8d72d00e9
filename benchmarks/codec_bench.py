"""Payload codecs (issue 25): size and speed of ``lossless``, ``delta``, ``q8``, and the
entropy coders they were chosen from.

Data:

* ``random-init N(0,1) fp32`` / ``bf16``: ``--size`` of standard normal values (random
  initialisation, NOT trained weights; labelled so);
* ``trained fp32`` / ``trained bf16``: the llm-offload example's GPT
  (examples/llm-offload, ``--preset``, default ``tiny``) after ``--pretrain-rounds``
  rounds of its local training (``local-steps`` AdamW steps at ``lr`` on its synthetic
  token stream, a fresh optimizer each round, as its ClientApp does; defaults: the
  example's 2 steps, lr 1e-3, batch 4 x 128 tokens), fp32 master weights and the bf16
  weights that travel;
* ``delta``: the same model after ONE more round (the example's default lr and steps)
  against the model it started from (what a client uploads with ``codec=delta``);
  ``q8``: that update quantised (ratio against the fp32 raw bytes, as the target).

Speed: encode / decode on one thread (``threads=1``), in GB/s of RAW payload bytes per
CPU-second of the process (``time.process_time``; steadier than wall time on a loaded
machine); wall-clock GB/s next to it. Encode is the coder alone (``digest=False``);
the wire digest (sha256t, which raw pays on more bytes) is timed on its own row.
Decode: into a reused (warm) buffer, as the reference coders' outputs reuse freed
memory; and (last column) into the arrays' final ``bytes`` (:func:`decode_record`:
fresh memory, page faults included, as any receiver of a new payload pays). Each figure: median of ``--repeat`` (3)
with min-max. Reference coders on the same bytes (same measurement): blosc2
(shuffle/bitshuffle + zstd/lz4, one thread), zstandard level 1 on the raw bytes (no
byte grouping), numcodecs Shuffle + Zstd(1).

Usage: python benchmarks/codec_bench.py [--size 64MiB] [--repeat 3] [--preset tiny]
       [--json out.json] [--no-reference]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from flwr_transports import codec
from flwr_transports.codec import parse_size
from flwr_transports.codecs import Base, Decoder, ErrorFeedback, decode_record, encode

ROOT = Path(__file__).resolve().parent.parent


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], check=False, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn, repeat: int):
    """[(cpu_s, wall_s)], last result."""
    out, res = [], None
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        res = fn()
        out.append((time.process_time() - c0, time.perf_counter() - w0))
    return out, res


def stat(nbytes: int, times: list[tuple[float, float]]) -> dict:
    cpu = sorted(nbytes / max(c, 1e-9) / 1e9 for c, _ in times)
    wall = sorted(nbytes / max(w, 1e-9) / 1e9 for _, w in times)
    return {"cpu_gbps": statistics.median(cpu), "cpu_min": cpu[0], "cpu_max": cpu[-1],
            "wall_gbps": statistics.median(wall), "wall_min": wall[0], "wall_max": wall[-1]}


def fmt(s: dict) -> str:
    return (f"{s['cpu_gbps']:5.2f} ({s['cpu_min']:.2f}-{s['cpu_max']:.2f}) "
            f"wall {s['wall_gbps']:5.2f}")


# ------------------------------------------------------------------ data


def bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype("<u2")


def random_records(size: int) -> dict[str, ArrayRecord]:
    rng = np.random.default_rng(0)
    n = size // 4
    # 8 arrays, like the layers of a model
    f32 = ArrayRecord({f"layer{i}": Array(rng.standard_normal(n // 8).astype(np.float32))
                       for i in range(8)})
    bf = ArrayRecord({k: Array(dtype="torch.bfloat16", shape=(len(v.data) // 4 - 32,),
                               stype="torch.raw",
                               data=bf16_bits(rng.standard_normal(n // 8)).tobytes())
                      for k, v in f32.items()})
    return {"random-init N(0,1) fp32": f32, "random-init N(0,1) bf16": bf}


def train_example(preset: str, pretrain_rounds: int, steps: int, lr: float, batch: int,
                  seq: int):
    """(state after the pre-training rounds, state after one more round), fp32."""
    import torch
    sys.path.insert(0, str(ROOT / "examples" / "llm-offload"))
    from llm_offload.data import Language
    from llm_offload.model import empty_model
    from llm_offload.model import preset as get_preset

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = get_preset(preset)
    model = empty_model(cfg).init_weights(0)
    lang = Language(cfg.vocab_size, min(512, cfg.vocab_size), seed=0)
    states = []
    losses = []
    for rnd in range(pretrain_rounds + 1):
        if rnd == pretrain_rounds:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # per round
        for step in range(steps):
            x, y = lang.batch(batch, seq, seed=hash((rnd, step)) & 0xFFFFFFF)
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states[0], states[1], losses


def state_record(sd, bf16: bool) -> ArrayRecord:
    import torch

    from flwr_transports.torch import state_dict_to_arrays
    return state_dict_to_arrays({k: v.to(torch.bfloat16 if bf16 else torch.float32)
                                 for k, v in sd.items()})


# ------------------------------------------------------------------ measurements


def measure_codec(name: str, rec: ArrayRecord, codec_name: str, repeat: int, *,
                  base_rec: ArrayRecord | None = None, ratio_of: int | None = None) -> dict:
    p = codec.encode(rec)
    base = Base.from_payload(codec.encode(base_rec)) if base_rec is not None else None
    fb = ErrorFeedback() if codec_name == "q8" else None

    def enc():
        if fb is not None:
            fb.clear()  # every repeat encodes the same first round
        return encode(p, codec_name, base=base, feedback=fb, threads=1, digest=False)

    et, e = timed(enc, repeat)
    wire = e.to_bytes()
    mv = memoryview(wire)

    def dec():
        d = Decoder(lambda o, n: mv[o: o + n], len(wire), base=base)
        return decode_record(d, threads=1)

    dt, out = timed(dec, repeat)
    if codec_name != "q8":
        assert codec.encode(out).digest == p.digest, "not exact"
    warm = bytearray(p.size)
    d = Decoder(lambda o, n: mv[o: o + n], len(wire), base=base)
    wt, _ = timed(lambda: d.decode_into(warm, threads=1), repeat)
    denom = ratio_of if ratio_of is not None else p.size
    return {"data": name, "codec": codec_name, "raw_bytes": p.size, "wire_bytes": e.size,
            "ratio": e.size / denom, "ratio_of": "fp32 raw" if ratio_of else "raw",
            "encode": stat(p.size, et), "decode": stat(p.size, wt),
            "decode_record": stat(p.size, dt)}


def reference_coders(name: str, rec: ArrayRecord, repeat: int) -> list[dict]:
    """The candidates, per 16 MiB window of the raw payload, one thread."""
    out = []
    raw = codec.encode(rec).to_bytes()
    isz = 2 if "bf16" in name else 4
    W = 16 << 20
    windows = [raw[i: i + W] for i in range(0, len(raw), W)]
    coders = {}
    try:
        import blosc2
        blosc2.set_nthreads(1)
        for label, filt, cod in [
            ("blosc2 shuffle+zstd1", blosc2.Filter.SHUFFLE, blosc2.Codec.ZSTD),
            ("blosc2 bitshuffle+zstd1", blosc2.Filter.BITSHUFFLE, blosc2.Codec.ZSTD),
            ("blosc2 shuffle+lz4", blosc2.Filter.SHUFFLE, blosc2.Codec.LZ4),
        ]:
            kw = {"codec": cod, "clevel": 1 if cod == blosc2.Codec.ZSTD else 5,
                  "typesize": isz, "filters": [filt], "nthreads": 1,
                  "splitmode": blosc2.SplitMode.ALWAYS_SPLIT}
            coders[label] = (lambda b, kw=kw: blosc2.compress2(b, **kw),
                             lambda c: blosc2.decompress2(c))
    except ImportError:
        print("(blosc2 not installed: pip install blosc2)")
    import zstandard
    zc, zd = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    coders["zstd1 (no byte grouping)"] = (zc.compress, zd.decompress)
    try:
        import numcodecs
        sh, zs = numcodecs.Shuffle(elementsize=isz), numcodecs.Zstd(level=1)
        coders["numcodecs Shuffle+Zstd1"] = (lambda b: zs.encode(sh.encode(b)),
                                             lambda c: sh.decode(zs.decode(c)))
    except ImportError:
        print("(numcodecs not installed: pip install numcodecs)")
    for label, (c, d) in coders.items():
        et, enc = timed(lambda c=c: [c(w) for w in windows], repeat)
        dt, dec = timed(lambda d=d, enc=enc: [d(x) for x in enc], repeat)
        assert b"".join(bytes(x) for x in dec) == raw
        out.append({"data": name, "codec": label, "raw_bytes": len(raw),
                    "wire_bytes": sum(len(x) for x in enc),
                    "ratio": sum(len(x) for x in enc) / len(raw), "ratio_of": "raw",
                    "encode": stat(len(raw), et), "decode": stat(len(raw), dt)})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--pretrain-rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json", default="")
    ap.add_argument("--no-reference", action="store_true")
    a = ap.parse_args(argv)
    load_before = uptime()
    print("load before:", load_before)
    rows = []
    size = parse_size(a.size)
    for name, rec in random_records(size).items():
        rows.append(measure_codec(name, rec, "lossless", a.repeat))
        if "fp32" in name:
            segs = codec.encode(rec).segments
            ht, _ = timed(lambda segs=segs: codec.hash_segments(segs), a.repeat)
            n = sum(len(x) for x in segs)
            rows.append({"data": name, "codec": "(sha256t digest, all threads)", "raw_bytes": n,
                         "wire_bytes": n, "ratio": 1.0, "ratio_of": "raw",
                         "encode": stat(n, ht), "decode": stat(n, ht)})
        if not a.no_reference:
            rows += reference_coders(name, rec, a.repeat)
    # speed of delta/q8 at size (synthetic: N(0, 0.02) weights, every one moved by
    # N(0, 1e-3), as one Adam round does; ratios for these come from the trained rows)
    rng = np.random.default_rng(1)
    n = size // 4 // 8
    w0 = [(rng.standard_normal(n) * 0.02).astype(np.float32) for _ in range(8)]
    w1 = [w + (rng.standard_normal(n) * 1e-3).astype(np.float32) for w in w0]
    for tag in ("fp32", "bf16"):
        def rec(ws, tag=tag):
            if tag == "fp32":
                return ArrayRecord({f"l{i}": Array(w) for i, w in enumerate(ws)})
            return ArrayRecord({f"l{i}": Array(dtype="torch.bfloat16", shape=(n,),
                                               stype="torch.raw", data=bf16_bits(w).tobytes())
                                for i, w in enumerate(ws)})
        for cod in ("delta", "q8"):
            rows.append(measure_codec(f"synthetic update {tag} (speed only)", rec(w1), cod,
                                      a.repeat, base_rec=rec(w0)))
    t0 = time.time()
    s0, s1, losses = train_example(a.preset, a.pretrain_rounds, a.local_steps, a.lr, 4, 128)
    print(f"trained {a.preset}: {a.pretrain_rounds} rounds + 1 of {a.local_steps} AdamW steps "
          f"at lr {a.lr} ({time.time() - t0:.1f} s); loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    f32_size = codec.encode(state_record(s1, False)).size
    for bf in (False, True):
        tag = "bf16" if bf else "fp32"
        base_rec, new_rec = state_record(s0, bf), state_record(s1, bf)
        rows.append(measure_codec(f"trained {a.preset} {tag}", new_rec, "lossless", a.repeat))
        if not a.no_reference:
            rows += reference_coders(f"trained {a.preset} {tag}", new_rec, a.repeat)
        rows.append(measure_codec(f"trained {a.preset} {tag}, update of 1 round", new_rec,
                                  "delta", a.repeat, base_rec=base_rec))
        rows.append(measure_codec(f"trained {a.preset} {tag}, update of 1 round", new_rec,
                                  "q8", a.repeat, base_rec=base_rec, ratio_of=f32_size))
    print("load after:", uptime())
    print(f"\n{'data':44s} {'codec':30s} {'ratio':>7s}  {'encode GB/s/core (range)':34s} "
          f"{'decode GB/s/core (range)':34s} decode->arrays (fresh memory)")
    for r in rows:
        fresh = fmt(r["decode_record"]) if "decode_record" in r else ""
        print(f"{r['data']:44s} {r['codec']:30s} {100 * r['ratio']:6.1f}%  "
              f"{fmt(r['encode']):34s} {fmt(r['decode']):34s} {fresh}"
              + ("  (% of fp32 raw)" if r["ratio_of"] != "raw" else ""))
    if a.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=False,
                                capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=ROOT, check=False, capture_output=True,
                                    text=True).stdout.strip())
        Path(a.json).write_text(json.dumps({"kind": "codec-bench", "load_before": load_before,
                                            "load": uptime(), "commit": commit, "dirty": dirty,
                                            "command": " ".join(sys.argv), "args": vars(a),
                                            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
