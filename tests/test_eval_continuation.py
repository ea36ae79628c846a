"""`ttt-speech eval continuation` end to end, offline: the LibriVox fixture (skipped cleanly without
Debian's pocketsphinx-testdata), a tiny random-init Moshi generating a few seconds, and tiny
random-init Whisper / WavLM / text LM written in the hub cache's layout under the default ids
(scripts/make_local_judges.py), so that the real `transformers` loading code runs."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from ttt_speech import tiny_moshi_lm
from ttt_speech.cli import main
from ttt_speech_apps.eval import fixture
from ttt_speech_apps.eval.config import ContinuationSettings, load_config
from ttt_speech_apps.eval.continuation import Continuation, Lengths, generate_spans
from ttt_speech_apps.eval.continuation_metrics import METRICS, drift_reference
from ttt_speech_apps.eval.continuation_scorer import Judges, Reference, Scorer, Span

PNG = b"\x89PNG\r\n\x1a\n"
TINY = {"dim": 64, "num_layers": 2, "num_heads": 2, "text_card": 100, "context": 100}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(LibriLight tree, codes cache, hub cache holding the tiny judges under the default ids)."""
    if not fixture.SOURCE.is_dir():
        pytest.skip("pocketsphinx-testdata is not installed (apt-get install -y pocketsphinx-testdata)")
    pytest.importorskip("transformers")  # the `omni` extra: the judges load through it
    from make_local_judges import make_judges  # scripts/, on sys.path by conftest

    root = tmp_path_factory.mktemp("continuation")
    fixture.make_fixture(root / "tree", synthetic_books=1, synthetic_seconds=12.0)
    make_judges(root / "judges", hub_cache=root / "hf-cache")
    return root / "tree", root / "codes", root / "hf-cache"


def write_config(path: Path, setup, **continuation) -> Path:
    """A config continuing (at most) two fixture books for 6 s in 2 s spans; `continuation` overrides."""
    tree, codes, _ = setup
    data = {"model": {"name": "tiny", "tiny": TINY, "device": "cpu"},
            "ttt": {"mini_batch_size": 16, "gate_init": 0.5},
            "data": {"root": str(tree), "codes_cache": str(codes), "max_books": 2, "min_duration": 5},
            "continuation": {"prompt_seconds": 4, "max_minutes": 0.1, "span_seconds": 2, "batch_size": 2,
                             "asr_max_tokens": 12, **continuation},
            "output_dir": str(path.parent / "out")}
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_command_offline_on_the_fixture(setup, tmp_path, capsys, offline):
    """TTT model and baseline continue two books for 6 s (three 2 s spans each); every metric the
    tiny judges allow is measured on every span, for the models and for the books' own continuation;
    one plot per measured metric. (Random judges: only the pipeline is tested here; the metrics
    have their known answers in tests/test_continuation_metrics.py and below.)"""
    offline(setup[2])
    config = write_config(tmp_path / "c.yaml", setup)
    assert main(["eval", "continuation", str(config), "--baseline", "--quiet"]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "continuation.json").read_text())
    assert set(report["summary"]) == {"ground_truth", "ttt", "baseline"}
    assert report["lengths"] == {"prompt_frames": 50, "generated_frames": 75, "span_frames": 25, "spans": 3,
                                 "quantiles": [0.25, 0.5, 0.75, 1.0], "span_centres_s": [1.0, 3.0, 5.0]}
    measured = {m for m, v in report["metrics"].items() if v["measured"]}
    # the tiny model has no text tokenizer (its text stream cannot be read) and the fixture no transcripts
    assert measured == set(METRICS) - {"wer", "wer_text_stream"}
    for name in ("ttt", "baseline"):
        per_stream = report["spans"][name]
        assert len(per_stream) == 2 and all(len(spans) == 3 for spans in per_stream.values())
        for span in (s for spans in per_stream.values() for s in spans):
            assert isinstance(span["transcript"], str) and span["drift"] > 0
            assert -1 <= span["speaker_similarity"] <= 1 and span["nll_audio"] > 0 and span["gen_ppl"] > 1
    nll = [s["nll_audio"] for spans in report["spans"]["ttt"].values() for s in spans]
    assert len(set(nll)) == len(nll)  # sampled, not degenerate
    truth = [s["drift"] for spans in report["spans"]["ground_truth"].values() for s in spans]
    assert len(truth) == 6 and len(set(truth)) == 6 and min(truth) > 0  # the books reach 10 s: 3 spans each
    assert report["summary"]["ground_truth"]["nll_audio"]["overall"] is None  # nothing generated to score
    assert set(report["vs_baseline"]) == {"ttt"}
    for metric in measured:
        assert (out / f"continuation_{metric}.png").read_bytes()[:8] == PNG
    assert not (out / "continuation_wer.png").exists()
    markdown = (out / "continuation.md").read_text()
    assert "## Over time" in markdown and "drift from the prompt" in markdown
    printed = capsys.readouterr().out
    assert "drift from the prompt: ground_truth" in printed and "continuation.json" in printed


def test_a_judge_missing_from_the_cache_is_one_line_before_anything_loads(setup, tmp_path, capsys, offline):
    offline(setup[2])
    config = write_config(tmp_path / "c.yaml", setup, speaker_model="org/absent-wavlm")
    assert main(["eval", "continuation", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "continuation.speaker_model" in err and "org/absent-wavlm" in err
    assert "hf download" in err and not (tmp_path / "out").exists()


def test_metrics_off_a_short_last_span_a_short_book_and_a_model_that_diverges(setup, tmp_path, monkeypatch,
                                                                              offline):
    """No judge (none needed, none looked for: an empty cache), silence off: only drift, own NLL and
    padding are measured. 15 s generated in 2 s spans: the last span is 1.04 s. The synthetic book
    (12 s) has 8 s of ground truth after its prompt: 4 spans. The baseline diverges after its first
    span: that span is kept, the rest are missing, the report says so, nothing is lost."""
    from ttt_speech.generate import GenerationDiverged
    from ttt_speech_apps.eval import continuation

    offline(tmp_path / "empty-cache")
    original = continuation.generate_spans

    def diverging(model, *args, **kwargs):
        made = original(model, *args, **kwargs)
        yield next(made)
        if model.name == "baseline":
            made.close()
            raise GenerationDiverged(30, 80, [(0, "text")])
        yield from made

    monkeypatch.setattr(continuation, "generate_spans", diverging)
    metrics = [m for m in METRICS if m != "silent_fraction"]
    config = write_config(tmp_path / "c.yaml", setup, max_minutes=0.25, asr_model=None, speaker_model=None,
                          metrics=metrics)
    assert main(["eval", "continuation", str(config), "--baseline", "--quiet"]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "continuation.json").read_text())
    measured = {m for m, v in report["metrics"].items() if v["measured"]}
    assert measured == {"drift", "nll_text", "nll_audio", "text_padding"}
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"continuation_{m}.png" for m in measured)
    ttt = report["spans"]["ttt"]
    assert all(len(spans) == 8 for spans in ttt.values())
    last = next(iter(ttt.values()))[-1]
    assert last["seconds"] == pytest.approx(13 / 12.5) and "gen_ppl" not in last and "silent_fraction" not in last
    truth = {stream: len(spans) for stream, spans in report["spans"]["ground_truth"].items()}
    assert sorted(truth.values()) == [4, 8]  # the synthetic book ends 8 s after its prompt
    assert all(len(spans) == 1 for spans in report["spans"]["baseline"].values())
    assert set(report["diverged"]["baseline"]) == set(ttt) and "non-finite logits" in \
        next(iter(report["diverged"]["baseline"].values()))
    assert "## Diverged" in (out / "continuation.md").read_text()
    assert report["lengths"]["span_centres_s"][-1] == pytest.approx((175 + 188) / 2 / 12.5)


def test_settings_refused_while_planning(setup, tmp_path, offline):
    offline(setup[2])
    config = write_config(tmp_path / "c.yaml", setup)
    with pytest.raises(ValueError, match="^ttt: generation: e2e_mlp models cannot run LMGen.step"):
        Continuation(load_config(config, ["ttt.layer_type=e2e_mlp", "ttt.mini_batch_size=4"])).plan()
    for settings, message in [({"quantiles": [0.5, 0.25, 1.0]}, "quantiles: expected increasing fractions"),
                              ({"metrics": ["drift", "bleu"]}, r"metrics\[1\]: expected one of \['drift'"),
                              ({"prompt_seconds": 0.3}, "prompt_seconds: expected at least 0.5 s for speaker"),
                              ({"max_minutes": float("inf")}, "max_minutes: expected a finite number of minutes")]:
        with pytest.raises(ValueError, match=message):
            ContinuationSettings(**settings)
    ContinuationSettings(prompt_seconds=0.3, speaker_model=None)  # no voice to compare: any prompt


def test_spans_are_yielded_as_they_are_generated():
    """Nothing but the current span is held: each span comes out once its frames are generated,
    before the next frame is; the last span may be shorter."""
    from ttt_speech import TTTConfig, patch_moshi
    from ttt_speech.generate import GenerationConfig
    from ttt_speech.models import ModelConfig, load_mimi
    from ttt_speech_apps.eval.continuation import ContinuationData
    from ttt_speech_apps.eval.plan import EvalModel, PlannedModel

    lm = tiny_moshi_lm(seed=0, **TINY).eval()
    patch_moshi(lm, TTTConfig(mini_batch_size=4))
    mimi = load_mimi(ModelConfig(device="cpu"))
    model = EvalModel(PlannedModel("ttt", "ttt", None, None, None, None, 16, ("chunked",)), lm, "test")
    settings = ContinuationSettings()
    data = ContinuationData(None, [], [], Scorer(Judges(None, None, None), mimi, None, (3, 0), settings),
                            torch.arange(8) + 3)
    lengths = Lengths(prompt=6, generated=10, span=4)
    prompts = [torch.randint(0, 100, (17, 6)) for _ in range(2)]
    for p in prompts:
        p[1:] %= 64
    done = []
    with torch.no_grad():
        for spans in generate_spans(model, prompts, GenerationConfig(seed=1), data, lengths, done.append):
            assert len(spans) == 2 and spans[0].start == sum(done) - spans[0].codes.shape[1]
            n = spans[0].codes.shape[1]
            assert [s.pcm.numel() for s in spans] == [n * mimi.frame_size] * 2 and spans[0].nll.shape == (9, n)
            assert torch.isfinite(spans[0].nll).all() and not torch.equal(spans[0].codes, spans[1].codes)
    assert sum(done) == 10 and [s for s in lengths.spans()] == [(0, 4), (4, 8), (8, 10)]


class WordTokenizer:
    """A stand-in for the SentencePiece text tokenizer: id i is word i."""

    words = ["<0>", "a", "b", "<3>", "the", "cat", "sat", "down"]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


class FixedASR:
    def __init__(self, said):
        self.said = said

    def transcribe(self, pcm, sample_rate):
        return [self.said] * len(pcm)


def test_wer_against_the_book_and_against_the_models_own_text():
    """WER against the book's transcript of the same span (when the data has one) and against the
    model's own text stream (padding dropped): 0 where the ASR heard exactly that, counted edits
    otherwise; a stream without words (all padding) has no reference."""
    from ttt_speech.models import ModelConfig, load_mimi

    mimi = load_mimi(ModelConfig(device="cpu"))
    scorer = Scorer(Judges(FixedASR("The cat sat."), None, None), mimi, WordTokenizer(), (3, 0),
                    ContinuationSettings(metrics=[m for m in METRICS if m != "drift"]))
    text = torch.tensor([4, 3, 5, 3, 0, 6])  # "the cat sat" between padding
    span = Span(0, 0, torch.zeros(4 * mimi.frame_size), torch.zeros(8, 6, dtype=torch.long), text, None)
    book = Reference(None, None, [["the", "cat", "sat", "down"]])
    record = scorer.score([span], [book])[0]
    assert record["wer_text_stream"] == 0 and record["wer"] == pytest.approx(0.25)  # one deletion of four
    assert record["text_stream"] == "the cat sat" and record["text_padding"] == pytest.approx(0.5)
    assert (record["wer_edits"], record["wer_words"]) == (1, 4)  # what a corpus rate sums
    assert record["silent_fraction"] == 1.0 and "drift" not in record and record["nll_text"] is None
    silent = Span(0, 0, span.pcm, span.codes, torch.full((6,), 3), None)
    assert scorer.score([silent], [Reference(None, None, [None])])[0]["wer_text_stream"] is None


def test_drift_of_real_codes_against_their_own_prompt(setup):
    """Through the probe's own latents (Mimi's quantiser): a replay of the prompt is closer to it than
    the rest of the same book, which is closer than codes of another distribution (uniform noise)."""
    from ttt_speech.models import ModelConfig, load_mimi
    from ttt_speech_apps.eval.continuation_metrics import drift
    from ttt_speech_apps.eval.plan import plan_eval
    from ttt_speech_apps.eval.streams import load_data

    config = load_config(write_config(setup[0].parent / "d.yaml", setup))
    plan = plan_eval(config, modes=("chunked",))
    lm = tiny_moshi_lm(seed=0, **TINY)
    book = load_data(plan.data, lm, plan.base, progress=False).streams[0].codes[1:9]
    assert book.shape[1] >= 150 and book[:, :50].unique().numel() > 50
    scorer = Scorer(Judges(None, None, None), load_mimi(ModelConfig(device="cpu")), None, (3, 0),
                    ContinuationSettings())
    reference = drift_reference(scorer.latents(book[:, :50]), k=5)
    replay = drift(reference, scorer.latents(book[:, :50]))
    same_book = drift(reference, scorer.latents(book[:, 75:150]))
    noise = drift(reference, scorer.latents(torch.randint(0, 2048, (8, 75), generator=torch.Generator().manual_seed(0))))
    assert replay < same_book < noise
