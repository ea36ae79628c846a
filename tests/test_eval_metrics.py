"""Metrics from per-position NLL: nothing is averaged over missing data, skipped is never a number."""
import json
import math

import numpy as np
import pytest
import torch

from ttt_speech_apps.eval import metrics
from ttt_speech_apps.eval.alignment import chunk_alignment
from ttt_speech_apps.eval.config import EvalSettings, LengthGenConfig
from ttt_speech_apps.eval.nll import StreamNLL
from ttt_speech_apps.eval.librilight import run_summary
from ttt_speech_apps.eval.report import markdown
from ttt_speech_apps.eval.writers import write_json


def stream(values: torch.Tensor, missing_last: int = 1) -> StreamNLL:
    """values [K, T]; the acoustic rows (2..) lack their last `missing_last` frames, as with delays."""
    mask = torch.ones_like(values, dtype=torch.bool)
    if missing_last:
        mask[2:, -missing_last:] = False
    nll = torch.where(mask, values, torch.full_like(values, float("nan")))
    return StreamNLL(nll.float(), mask, "chunked", 1.0, None, "cpu_rss_sampled", None)


def test_groups_and_series_use_only_scored_entries():
    values = torch.arange(4 * 5, dtype=torch.float).view(4, 5)
    s = metrics.group_series(stream(values))
    assert list(s) == ["text", "cb1", "cb2-3"]
    assert s["text"].tolist() == [0, 1, 2, 3, 4]
    assert s["cb2-3"][:4].tolist() == [12.5, 13.5, 14.5, 15.5] and math.isnan(s["cb2-3"][4])
    assert metrics.group_label("cb2-8") == "audio codebooks 2–8 (acoustic)"


def test_positions_beyond_every_stream_are_skipped_not_zero():
    a, b = np.ones(100), np.full(50, 3.0)
    points = metrics.at_positions([a, b], [40, 100, 200], window=20)
    assert points[0]["local"]["nll"] == pytest.approx(2.0) and points[0]["local"]["n_streams"] == 2
    assert points[1]["cumulative"]["nll"] == pytest.approx(1.0) and points[1]["cumulative"]["n_streams"] == 1
    assert "skipped" in points[2] and "nll" not in points[2]
    assert "no stream reaches 200 frames (longest: 100)" == points[2]["skipped"]


def test_missing_frames_are_left_out_of_means():
    a = np.array([1.0, np.nan, 3.0, np.nan])
    assert metrics.at_positions([a], [4], window=4)[0]["local"]["nll"] == pytest.approx(2.0)
    all_missing = np.full(10, np.nan)
    assert "skipped" in metrics.at_positions([all_missing], [10], 5)[0]["local"]


def test_binned_curve_counts_streams_per_bin():
    curve = metrics.binned_curve([np.ones(25), np.full(10, 3.0)], bin_frames=10)
    assert [(b["start"], b["n_streams"]) for b in curve] == [(0, 2), (10, 1), (20, 1)]
    assert curve[0]["nll"] == pytest.approx(2.0) and curve[-1]["stop"] == 25


def test_slope_and_context_gain_signs():
    t = np.arange(1, 2001)
    falling = 5.0 - 0.3 * np.log(t)
    slope = metrics.log_slope([falling], bin_frames=100)
    assert slope["slope"] == pytest.approx(-0.3, abs=0.02) and slope["per_doubling"] < 0
    assert "skipped" in metrics.log_slope([falling[:150]], bin_frames=100)
    gain = metrics.context_gain([falling, falling[:300]], window=200)
    assert gain["gain"] > 0 and gain["n_streams"] == 1 and gain["n_too_short"] == 1
    assert "skipped" in metrics.context_gain([falling[:300]], window=200)


def test_twenty_evaluation_lengths_from_half_to_ten_windows():
    lengths = metrics.evaluation_lengths(3000, 20, 0.5, 10.0)
    assert len(lengths) == 20 and lengths[0] == 1500 and lengths[-1] == 30000
    assert all(a < b for a, b in zip(lengths, lengths[1:]))
    points = metrics.length_points([np.ones(5000)], lengths, 3000, window=500)
    done = [p for p in points if "cumulative" in p]
    assert [p["length"] for p in done] == [p for p in lengths if p <= 5000]
    skipped = [p for p in points if "cumulative" not in p]
    assert len(skipped) == len(points) - len(done) > 0
    assert all(p["skipped"].startswith("no stream reaches") for p in skipped)


def test_chunk_alignment_efficiency():
    assert chunk_alignment(64, 16, 16)["efficiency"] == 1.0
    unaligned = chunk_alignment(64, 5, 16)
    assert not unaligned["aligned"] and unaligned["efficiency"] < 0.5
    assert chunk_alignment(64, 1, 16)["efficiency"] == pytest.approx(1 / 16)
    with pytest.raises(ValueError):
        chunk_alignment(0, 1, 16)


def test_mode_difference_ignores_only_the_unscored_tail_of_a_shorter_run():
    values = torch.rand(4, 30)
    long_run, short_run = stream(values), stream(values[:, :20] + 1e-6)
    d = metrics.mode_difference(long_run, short_run)
    assert d["frames"] == 20 and d["max_abs"] < 1e-5
    broken = stream(values[:, :20])
    broken.mask[1, 5] = False
    with pytest.raises(ValueError, match="masks differ"):
        metrics.mode_difference(long_run, broken)


def test_report_never_writes_nan(tmp_path):
    settings = EvalSettings(positions=[10, 1000], train_window=8, bin_frames=5, position_window=5, gain_window=5,
                            length_gen=LengthGenConfig(num_lengths=4))
    run = run_summary([stream(torch.rand(4, 40))], ["s0"], settings)
    text = json.dumps(run, allow_nan=False)  # would raise on NaN / inf
    assert '"skipped"' in text
    with pytest.raises(ValueError):
        write_json(tmp_path / "r.json", {"x": float("nan")})
    assert not (tmp_path / "r.json").exists()


def test_markdown_says_once_what_is_left_out():
    settings = EvalSettings(positions=[10, 1000], bin_frames=5, position_window=5, gain_window=5)
    run = run_summary([stream(torch.rand(4, 40))], ["s0"], settings)
    report = {"title": "t", "created": "now", "environment": {"device": "cpu", "torch": "x"},
              "models": {"baseline": {"source": "tiny", "ttt": None, "params": 1, "attention_context": 3000}},
              "data": {"counts": {"streams": 1, "frames": 40, "files_skipped": 0, "books_left_out": 0},
                       "skipped_files": [], "left_out_books": []},
              "alignment": {}, "markers": {"train_window": None},
              "settings": {"bin_frames": 5, "position_window": 5, "gain_window": 5},
              "runs": {"baseline/chunked": run}, "comparisons": {}}
    text = markdown(report)
    assert "Not reached by any stream (left out): position(s) 1,000." in text and "| 1,000 |" not in text
    assert "| 10 | local |" in text and "train_window is not set" in text and "nan" not in text.lower()
    assert "Peak memory: not shown, none rose above 8 MiB" in text and "| peak memory |" not in text

    report["data"]["uninformative"] = {"text": "padding"}
    text = markdown(report)
    assert "### text" not in text and "- text: left out of every table and plot: padding" in text
    assert "### audio codebook 1" in text


def test_log_bins_are_shared_and_the_paired_difference_has_an_error():
    assert metrics.log_edges(300)[:5] == [0, 1, 2, 3, 5] and metrics.log_edges(300)[-1] == 300
    assert set(metrics.log_edges(300)[:-1]) <= set(metrics.log_edges(5000))  # runs of any length share bins
    a = [np.linspace(2.0, 1.0, 100), np.linspace(3.0, 2.0, 100)]
    b = [s + 0.5 for s in a]
    diff = metrics.paired_difference(a, b, metrics.log_edges(100))
    assert all(abs(d["diff"] + 0.5) < 1e-12 and d["se"] < 1e-12 for d in diff)  # a constant shift: no spread
    b[1] = b[1] + 1.0
    diff = metrics.paired_difference(a, b, metrics.log_edges(100))
    assert all(abs(d["diff"] + 1.0) < 1e-12 and abs(d["se"] - 0.5) < 1e-12 for d in diff)
    curve = metrics.binned(a, metrics.log_edges(100))
    assert all(c["q25"] < c["nll"] < c["q75"] for c in curve)


def step_points(lengths, *levels, train_window=100):
    """length_points of one stream made of (frames, nll) steps: cumulative NLLs known by hand."""
    series = np.concatenate([np.full(n, v) for n, v in levels])
    return metrics.length_points([series], lengths, train_window, window=10)


def test_length_figures_on_grid_is_exact_and_past_the_longest_stream_is_not_reached():
    points = step_points([50, 100, 200, 400], (100, 1.0), (300, 2.0))  # cumulative NLL 1, 1, 1.5, 1.75
    fig = metrics.length_figures(points)
    assert list(fig["ppl_at"]) == ["1x", "5x", "10x"]
    assert fig["ppl_at"]["1x"] == {"factor": 1.0, "ppl": pytest.approx(math.e, rel=1e-12), "interpolated": False}
    for key in ("5x", "10x"):
        assert "ppl" not in fig["ppl_at"][key]
        assert fig["ppl_at"][key]["skipped"].startswith("not reached")
        assert "4x (400 frames)" in fig["ppl_at"][key]["skipped"]
    below = metrics.length_figures(points, factors=(0.25,))["ppl_at"]["0.25x"]
    assert below == {"factor": 0.25, "skipped": "below the shortest evaluated length 0.5x"}
    json.dumps(fig, allow_nan=False)


def test_length_figures_interpolates_log_ppl_against_log_factor():
    points = step_points([50, 100, 200, 400], (100, 1.0), (300, 2.0))
    at3 = metrics.length_figures(points, factors=(3.0,))["ppl_at"]["3x"]
    # between 2x (ln ppl 1.5) and 4x (ln ppl 1.75): not the nearest point (e^1.75), nor linear in factor (e^1.625)
    expected = math.exp(1.5 + 0.25 * math.log(3 / 2) / math.log(4 / 2))
    assert at3["ppl"] == pytest.approx(expected, rel=1e-12) and at3["interpolated"] is True
    assert at3["between"] == [200, 400]
    # on the real geometric grid, 1x lies between two grid lengths
    grid = metrics.evaluation_lengths(800)
    fig = metrics.length_figures(metrics.length_points([np.full(1000, 2.0)], grid, 800, window=100))
    lo, hi = fig["ppl_at"]["1x"]["between"]
    assert lo < 800 < hi and [lo, hi] == [max(g for g in grid if g < 800), min(g for g in grid if g > 800)]


def test_length_figures_degradation_ratio_and_best_length():
    # cumulative NLL at 50..300: 3, 2, 5/3, 2.25, 17/6 (lowest at 150 frames, highest at 50); 1000 not reached
    points = step_points([50, 100, 150, 200, 300, 1000], (50, 3.0), (100, 1.0), (150, 4.0))
    fig = metrics.length_figures(points)
    assert fig["degradation_ratio"] == pytest.approx(math.exp(3.0 - 5 / 3), rel=1e-12)
    assert fig["best"] == {"length": 150, "factor": 1.5, "ppl": pytest.approx(math.exp(5 / 3), rel=1e-12)}
    # 1x is on the grid (100 frames); 5x and 10x are past the 300-frame stream
    assert fig["ppl_at"]["1x"]["ppl"] == pytest.approx(math.exp(2.0)) and "skipped" in fig["ppl_at"]["5x"]


def test_length_figures_constant_series_and_too_few_reached_points():
    grid = metrics.evaluation_lengths(100, 10, 0.5, 10.0)
    fig = metrics.length_figures(metrics.length_points([np.full(2000, 2.0)], grid, 100, window=10))
    assert fig["degradation_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert all(v["ppl"] == pytest.approx(math.exp(2.0)) for v in fig["ppl_at"].values())
    one = metrics.length_figures(step_points([50, 100, 200], (60, 1.0)))  # only 50 frames reached
    assert set(one["degradation_ratio"]) == {"skipped"} and one["best"]["length"] == 50
    assert all("skipped" in v for v in one["ppl_at"].values())
    # a point a stream reaches but with no scored frame (cumulative skipped) is not a reached point
    gap = metrics.length_figures(step_points([50, 100], (60, np.nan), (40, 1.0)))
    assert "skipped" in gap["degradation_ratio"] and gap["best"]["length"] == 100
    none = metrics.length_figures([])
    assert "skipped" in none["best"] and "skipped" in none["degradation_ratio"]
    json.dumps([fig, one, gap, none], allow_nan=False)


def test_length_figures_render_when_only_one_length_was_reached():
    """One reached length has no degradation ratio ({"skipped": why}): the log line and the Markdown
    table say "—" (both once raised on formatting the dict)."""
    from ttt_speech_apps.eval import report

    figures = {"ppl_at": {"1x": {"ppl": 14.3, "interpolated": False}, "5x": {"skipped": "not reached"}},
               "degradation_ratio": {"skipped": "1 reached length(s): a ratio needs 2"},
               "best": {"skipped": "1 reached length(s)"}}
    assert report.length_figures_line(figures) == "ppl @1x 14.300, @5x not reached; max/min —; best L —"
    entries = {"trained": {"cb1": {"points": [{"length": 64, "factor": 1.0, "cumulative": {"ppl": 14.3, "frames": 64}}],
                                   "figures": figures}}}
    assert any("| trained | 14.300 | not reached | — | — |" in line
               for line in report.length_tables(entries, {"cb1": "codebook 1"}, 64))
