"""Published figures are generated from docs/bench-data, not typed (issue 27).

* every ``<!-- figures:begin NAME (generated from FILE.json by ftx-bench render) -->``
  block in README.md and docs/ equals what ``ftx-bench render`` makes of its JSON;
* README.md and every page under docs/ quote no ratio (``4.8x``) or time (``12.3 s``)
  outside a generated block or a History section, except the short allow-list
  (tests/figures-allowlist.txt, each entry with its reason). A setting or a protocol
  constant is written with its unit spelled out (``60 seconds``, ``500 ms``,
  ``4 × the payload``): the abbreviations ``s`` and ``x`` are for measured figures.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

render = pytest.importorskip("ftx_bench.render", reason="pip install -e benchmarks")
from ftx_bench.reproduce import FLOOR_DEFINITION

ROOT = Path(__file__).resolve().parent.parent
FIGURE = re.compile(r"\b\d+(?:\.\d+)?x\b|\b\d+(?:\.\d+)? s\b")
BLOCK = re.compile(r"<!-- figures:begin .*?<!-- figures:end -->", re.DOTALL)
HISTORY = re.compile(r"<!-- figures:history-begin -->.*?<!-- figures:history-end -->",
                     re.DOTALL)
#: every page the figures rule covers: README.md, docs/*.md, docs/links/*.md
STRICT = tuple(str(p.relative_to(ROOT)) for p in render.doc_paths(ROOT))


def loose_figures(text: str) -> list[tuple[int, str, str]]:
    """(line number, figure, line) outside generated blocks and History sections."""
    def blank(mo: re.Match) -> str:
        return "\n" * mo.group().count("\n")

    text = HISTORY.sub(blank, BLOCK.sub(blank, text))
    return [(i, m.group(), line) for i, line in enumerate(text.splitlines(), 1)
            for m in FIGURE.finditer(line)]


def allowlist() -> list[tuple[str, str, str]]:
    out = []
    for raw in (ROOT / "tests" / "figures-allowlist.txt").read_text("utf-8").splitlines():
        if raw.strip() and not raw.startswith("#"):
            path, text, reason = (p.strip() for p in raw.split("::"))
            assert reason, f"allow-list entry without a reason: {raw!r}"
            out.append((path, text, reason))
    return out


def test_generated_blocks_match_their_data():
    assert render.stale(ROOT) == [], "run: ftx-bench render"


def test_a_changed_figure_in_a_block_is_caught():
    text = (ROOT / "README.md").read_text("utf-8")
    assert "figures:begin readme-loopback" in text
    good = render.render_text(text, ROOT)
    assert good == text
    head, tail = good.split("figures:begin readme-loopback", 1)
    block, rest = tail.split("figures:end", 1)
    # one figure of the table changed by a hundredth
    changed = re.sub(r"\| (\d+)\.(\d)(\d)", lambda m: f"| {m[1]}.{m[2]}{(int(m[3]) + 1) % 10}",
                     block, count=1)
    assert changed != block
    tampered = head + "figures:begin readme-loopback" + changed + "figures:end" + rest
    assert render.render_text(tampered, ROOT) != tampered


def test_readme_loopback_block_states_repeats_commit_and_load():
    text = (ROOT / "README.md").read_text("utf-8")
    block = text.split("figures:begin readme-loopback", 1)[1].split("figures:end", 1)[0]
    assert "**3 repeat(s) per point**" in block and "commit `" in block
    assert "load before each repeat" in block and "(older code version)" not in block


def test_floor_is_defined_once():
    text = (ROOT / "docs" / "benchmarks.md").read_text("utf-8")
    stated = FLOOR_DEFINITION[0].upper() + FLOOR_DEFINITION[1:]
    assert text.count(stated) == 1


@pytest.mark.parametrize("rel", STRICT)
def test_no_hand_typed_figures(rel):
    allowed = [(t, r) for p, t, r in allowlist() if p == rel]
    bad = [f"{rel}:{i}: {fig!r} in: {line.strip()}" for i, fig, line in
           loose_figures((ROOT / rel).read_text("utf-8"))
           if not any(t in line for t, _ in allowed)]
    assert not bad, ("figures outside generated blocks / the History section (generate "
                     "them with ftx-bench render, or move them to History with their "
                     "commit):\n" + "\n".join(bad))


def test_allowlist_entries_are_used():
    for path, text, _ in allowlist():
        lines = [line for _, _, line in loose_figures((ROOT / path).read_text("utf-8"))]
        assert any(text in line for line in lines), f"stale allow-list entry: {path} :: {text}"


def test_every_doc_page_is_checked():
    assert {"README.md", "docs/benchmarks.md", "docs/links/tcp.md"} <= set(STRICT)
    assert len(STRICT) == len(list(ROOT.glob("docs/*.md"))) + len(
        list(ROOT.glob("docs/links/*.md"))) + 1


# ---- the block views other than the per-run e2e table: their figures are the JSON's

BENCH = ROOT / "docs" / "bench-data"


def test_aggregation_view_rows_are_the_jsons_figures():
    import json

    doc = json.loads((BENCH / "e2e-aggregation-500-n2-tcp.json").read_text("utf-8"))
    rows = render.aggregation_rows(doc)
    models = [r for r in doc["results"] if r.get("kind") != "floor"]
    assert len(rows) == len(models) == 2
    for row, r in zip(rows, models, strict=True):
        assert row["serverapp_peak_mib"] == r["serverapp_peak_rss_bytes"] / 2**20
        assert row["agg_train_s"] == r["stats"]["agg_train_s"]
        assert row["round_s"] == r["round_s"] and row["agg_tail_s"] == r["agg_tail_s"]
        assert r["transport"].endswith("aggregation=" + row["aggregation"])
    text = render.render_block("aggregation-t", ["docs/bench-data/e2e-aggregation-500-n2-tcp.json"],
                               ROOT)
    assert "commit `85c1db1`" in text and "**one run**" in text
    assert f"{rows[1]['serverapp_peak_mib']:.0f} MiB | {rows[1]['x_model']:.1f}x" in text


def test_receive_loop_views_use_every_round_of_the_json():
    import json

    doc = json.loads((BENCH / "issue24-receive-loop.json").read_text("utf-8"))
    tails = render.receive_loop_tails(doc)
    for side in ("before", "after"):
        runs = doc[f"tail128_{side}"]["runs"] + [r for p in doc["tail128_pairs"]["runs"]
                                                 for r in p[side]["runs"]]
        expect = sorted(x for r in runs for x in r["agg_tail_s"])
        assert sorted(x for e in tails[side].values() for x in e["agg_tail_s"]) == expect
    polls = render.receive_loop_polls(doc)
    assert sorted(polls["A"]["inband"]["total_s"]) == sorted(
        r["total_s"] for r in doc["m2mib"]["runs"] if r["transport"] == "inband")
    assert sum(polls["B"]["tcp"]["pulls_per_round"]) == sum(
        sum(r["pulls_per_phase"]) for r in doc["m2mib_b"]["runs"] if r["transport"] != "inband")


def test_a_view_refuses_a_json_of_another_kind():
    with pytest.raises(ValueError, match="receive-loop-tails"):
        render.render_block("receive-loop-tails", ["docs/bench-data/e2e-lo-500-s5.json"], ROOT)
    with pytest.raises(ValueError, match="aggregation"):
        render.render_block("aggregation-x", ["docs/bench-data/issue24-receive-loop.json"], ROOT)


def _memory_links_doc(n8_tcp: list[float]) -> dict:
    def inv(vals):
        return {"repeats": [{"load_before": [1.0, 1.0, 1.0]}] * 3,
                "points": {f"{t}@128MiB": {"serverapp_peak_rss_mib": {"values": v, "n": 3}}
                           for t, v in vals.items()}}
    return {"kind": "reproduce", "table": "memory-links", "repeat": 3, "commit": "abc1234",
            "flwr_version": "1.42.0", "time_utc": "2026-12-06", "cpus": 2, "command": "x",
            "invocations": {"128MiB-N2": inv({"tcp://": [600.0, 610.0, 605.0],
                                              "shm://": [599.0, 599.0, 599.0]}),
                            "128MiB-N8": inv({"tcp://": n8_tcp,
                                              "shm://": [599.0, 600.0, 599.0]})}}


def test_memory_links_view_compares_the_medians_with_half_a_model(tmp_path):
    """The issue-24 table: medians and ranges from the JSON, and a link whose N = 8 peak
    is more than half a model above N = 2 is marked **no**."""
    import json

    for n8, verdict in (([640.0, 660.0, 650.0], "yes"), ([900.0, 1100.0, 1000.0], "**no**")):
        f = tmp_path / "m.json"
        f.write_text(json.dumps(_memory_links_doc(n8)))
        text = render.render_block("memory-links", [str(f)], tmp_path)
        tcp = next(line for line in text.splitlines() if line.startswith("| `tcp://`"))
        med = sorted(n8)[1]
        assert f"{med:.0f} MiB ({min(n8):.0f}-{max(n8):.0f}), n = 3" in tcp
        assert f"+{med - 605:.1f} MiB" in tcp and tcp.endswith(f"| {verdict} |")
        assert ("| `shm://` | 599 MiB (599-599), n = 3 | 599 MiB (599-600), n = 3 | +0.0 MiB "
                "| yes |") in text
    with pytest.raises(ValueError, match="memory-links"):
        render.render_block("memory-links", ["docs/bench-data/e2e-lo-500-s5.json"], ROOT)


def test_ray_step_view_prints_each_rounds_median_and_range_of_the_json(tmp_path):
    """docs/aggregation.md's server-step table: every round's median (min-max) over the
    repeats as the JSON has them, and a K whose model differed in one repeat says so."""
    import json

    def run(flower, k1, same):
        return {"load_before": [1.0, 2.0, 3.0], "load_after": [1.5, 2.0, 3.0],
                "step_s": {"flower": flower, "K=1": k1}, "bit_identical": {"K=1": same}}

    doc = {"kind": "ray-step", "strategy": "FedAdam", "mib": 64, "rounds": 2, "shards": [1],
           "repeat": 3, "object_store_bytes": 2 << 30, "ray_num_cpus": 2,
           "commit": "abc1234def", "dirty": [], "flwr_version": "1.42.0", "ray_version": "2",
           "numpy_version": "2", "cpus": 2, "time_utc": "2026-12-06T00:00:00", "command": "x",
           "runs": [run([0.9, 1.25], [0.7, 0.5], True), run([1.1, 1.75], [0.3, 0.6], True),
                    run([1.0, 1.5], [0.4, 0.45], True)]}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(doc))
    text = render.render_block("ray-step", [str(f)], tmp_path)
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert ("| Flower's FedAdam in the ServerApp (the step only) | 1.00 s (0.90-1.10) | "
            "1.50 s (1.25-1.75) | (reference) |") in rows.values()
    assert rows["| shard owners, K=1"].endswith(
        "| 0.40 s (0.30-0.70) | 0.50 s (0.45-0.60) | bit-identical in every repeat |")
    assert "**3 repeat(s)**" in text and "1.00/2.00/3.00 before, 1.50/2.00/3.00 after" in text
    doc["runs"][2]["bit_identical"]["K=1"] = False
    f.write_text(json.dumps(doc))
    text = render.render_block("ray-step", [str(f)], tmp_path)
    assert "| shard owners, K=1 |" in text and text.count("**differs**") == 1
    with pytest.raises(ValueError, match="ray-step"):
        render.render_block("ray-step", ["docs/bench-data/e2e-lo-500-s5.json"], ROOT)


# ---- the plots in docs/img: each PNG carries the figures it was drawn from


def test_plots_carry_the_inputs_their_data_gives():
    assert render.stale_plots(ROOT) == [], "run: ftx-bench render"


def test_plot_inputs_are_the_jsons_figures():
    import json

    inputs = render.plot_inputs("docs/img/bench-e2e-star-nodes-s5.png", ROOT)
    pts = inputs["series"]["tcp:// 1 Gbit/s uplink, 64 MiB"]["points"]
    for n, (round_s, overhead_s) in zip((2, 4, 8), [(p[1], p[2]) for p in pts], strict=True):
        doc = json.loads((BENCH / f"star-1gbit-n{n}-64MiB-s5.json").read_text("utf-8"))
        row, = [r for r in doc["results"] if r.get("kind") == "model"
                and r["transport"] == "tcp://"]
        assert (round_s, overhead_s) == (row["round_s"], row["overhead_s"])
        assert doc["environment"]["git_commit"] in inputs["provenance"]
    p2p = render.plot_inputs("docs/img/bench-p2p-loopback-k4.png", ROOT)
    doc = json.loads((BENCH / "p2p-lo-s2.json").read_text("utf-8"))
    assert sorted(v for pts in p2p["series"].values() for _, v in pts) == sorted(
        r["throughput_MBps"] for r in doc["results"]
        if r.get("k") == 4 and "latency_median_s" in r)
    assert "commit fdfd2cf (older code version)" in p2p["provenance"]


def test_a_changed_data_point_makes_its_plot_stale(tmp_path):
    import json
    import shutil

    img = "docs/img/bench-p2p-geo-distributed-k1.png"
    for d in ("bench-data", "img"):
        shutil.copytree(ROOT / "docs" / d, tmp_path / "docs" / d)
    assert render.stale_plots(tmp_path) == []
    path = tmp_path / "docs" / "bench-data" / "p2p-geo.json"
    doc = json.loads(path.read_text("utf-8"))
    next(r for r in doc["results"] if r.get("k") == 1)["throughput_MBps"] += 1.0
    path.write_text(json.dumps(doc), encoding="utf-8")
    (tmp_path / "docs" / "img" / "unlisted.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert render.stale_plots(tmp_path) == [img, "docs/img/unlisted.png"]


def test_every_plot_is_shown_in_the_docs():
    text = "".join(p.read_text("utf-8") for p in render.doc_paths(ROOT))
    for img in render.PLOTS:
        assert f"]({img.removeprefix('docs/')})" in text, img


def test_a_block_can_take_one_invocation_of_a_reproduce_table():
    one = render.render_block("x", ["docs/bench-data/repro-memory.json#128MiB-N8"], ROOT)
    every = render.render_block("x", ["docs/bench-data/repro-memory.json"], ROOT)
    assert "128MiB-N8:" in one and "500MiB-N2:" not in one
    assert "500MiB-N2:" in every and "128MiB-N8:" in every
    with pytest.raises(ValueError, match="no reproduce invocation 'N99'"):
        render.render_block("x", ["docs/bench-data/repro-memory.json#N99"], ROOT)
