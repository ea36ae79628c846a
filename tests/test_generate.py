"""Streaming generation (`ttt_speech.generate`, `ttt-speech generate`) on tiny random-init models.

Small LM (dim 64, 2 layers) for the session tests; the random Mimi (card 2048) only where audio
is decoded. Everything float32 on CPU, so "equal" means bit for bit.
"""
import numpy as np
import soundfile as sf
import pytest
import sphn
import torch

from conftest import inserted_modules
from ttt_speech import TTTConfig, patch_moshi
from ttt_speech.cli import main
from ttt_speech.data.audio import encode_pcm, read_audio
from ttt_speech.data.codes import Recording, load_codes, save_codes
from ttt_speech.generate import (
    AudioDecoder,
    GenerationConfig,
    GenerationDiverged,
    GenerationSession,
    continuation,
    load_state,
    read_state,
    sample_tokens,
    save_state,
    stream,
)
from ttt_speech.models import ModelConfig, load_lm, load_mimi

CARD, TEXT_CARD = 64, 100
SMALL = {"dim": 64, "num_layers": 2, "num_heads": 2, "card": CARD, "text_card": TEXT_CARD, "context": 40,
         "depformer_dim": 32, "depformer_dim_feedforward": 64, "depformer_num_layers": 1}
# card 2048 = the random Mimi's codebook size, so its codes can be decoded
AUDIO = {"dim": 64, "num_layers": 2, "num_heads": 2, "text_card": TEXT_CARD, "context": 40,
         "depformer_dim": 32, "depformer_dim_feedforward": 64, "depformer_num_layers": 1}
SAMPLING = GenerationConfig(temperature=1.0, text_temperature=1.0, top_k=20, top_p=0.9, seed=7)


def small_lm(ttt=True, seed=0, **kw):
    lm = load_lm(ModelConfig(device="cpu", seed=seed, tiny={**SMALL, **kw}))
    if ttt:
        patch_moshi(lm, TTTConfig(mini_batch_size=4, mode="hybrid"))
        with torch.no_grad():  # make the TTT branch matter
            for m in inserted_modules(lm):
                m.gate_alpha.fill_(0.5)
    return lm


def random_streams(T, seed, card=CARD):
    g = torch.Generator().manual_seed(seed)
    streams = torch.randint(0, card, (17, T), generator=g)
    streams[0] = torch.randint(0, TEXT_CARD, (T,), generator=g)
    return streams


SILENCE = torch.arange(8) + 3


@pytest.fixture(scope="module")
def lm():
    return small_lm()


@pytest.fixture(scope="module")
def mimi():
    return load_mimi(ModelConfig(device="cpu"))


def codes_of(frames, include_prompt=False):
    return continuation(frames, include_prompt)


# ----------------------------------------------------------------------------- sampling (pure)

def test_sampler_greedy_topk_topp_and_determinism():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    noise = torch.empty(1000, 4).exponential_(generator=torch.Generator().manual_seed(0))
    many = logits.expand(1000, 4)
    assert sample_tokens(many, 0.0).eq(0).all()                            # greedy
    assert sample_tokens(many, 1.0, top_k=1, noise=noise).eq(0).all()      # top-1 = greedy
    assert set(sample_tokens(many, 1.0, top_k=2, noise=noise).tolist()) == {0, 1}
    assert set(sample_tokens(many, 1.0, top_p=0.6, noise=noise).tolist()) == {0, 1}   # 0.5 < 0.6 ≤ 0.8
    assert sample_tokens(many, 1.0, top_p=0.5, noise=noise).eq(0).all()    # 0.5 reaches 0.5
    assert torch.equal(sample_tokens(many, 1.0, noise=noise), sample_tokens(many, 1.0, noise=noise.clone()))
    # an exact draw from softmax(logits / T): empirical frequencies over 40k draws
    big = torch.empty(40000, 4).exponential_(generator=torch.Generator().manual_seed(1))
    for temp in (1.0, 2.0):
        counts = torch.bincount(sample_tokens(logits.expand(40000, 4), temp, noise=big), minlength=4) / 40000
        assert (counts - torch.softmax(logits[0] / temp, -1)).abs().max() < 0.01
    # top-k then top-p, renormalised: tokens {0, 1, 2} by top-k, then nucleus 0.9 of those keeps all 3
    kept = sample_tokens(logits.expand(40000, 4), 1.0, top_k=3, top_p=0.99, noise=big)
    assert set(kept.tolist()) == {0, 1, 2}
    assert sample_tokens(torch.zeros(2, 3, 5), 1.0, noise=torch.ones(2, 3, 5)).shape == (2, 3)


@pytest.mark.parametrize("kwargs,message", [
    ({"top_p": 0.0}, "top_p: expected a number in (0, 1]"),
    ({"top_p": 1.5}, "top_p: expected a number in (0, 1]"),
    ({"text_top_p": float("nan")}, "text_top_p: expected a number in (0, 1]"),
    ({"top_k": -1}, "top_k: expected an integer >= 0"),
    ({"text_top_k": 2.5}, "text_top_k: expected an integer >= 0"),
    ({"temperature": -0.1}, "temperature: expected a number >= 0"),
    ({"text_temperature": float("inf")}, "text_temperature: expected a number >= 0"),
    ({"max_duration": 0}, "max_duration: expected a number of seconds > 0"),
    ({"seed": -1}, "seed: expected an integer >= 0"),
])
def test_bad_generation_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        GenerationConfig(**kwargs)


def test_sampler_rejects_bad_values_and_missing_noise():
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(torch.zeros(3), 1.0, top_p=2.0, noise=torch.ones(3))
    with pytest.raises(ValueError, match="noise"):
        sample_tokens(torch.zeros(3), 1.0)


@pytest.mark.parametrize("option,value,message", [
    ("--top-p", "1.5", "--top-p: expected a number in (0, 1]"),
    ("--top-p", "0", "--top-p: expected a number in (0, 1]"),
    ("--text-top-k", "-3", "--text-top-k: expected an integer >= 0"),
    ("--temperature", "-1", "--temperature: expected a number >= 0"),
    ("--max-duration", "0", "--max-duration: expected a number of seconds > 0"),
])
def test_cli_rejects_bad_values_with_one_line_naming_the_option(tmp_path, capsys, option, value, message):
    code = main(["generate", "x.wav", "--out", str(tmp_path), option, value])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_input_errors(tmp_path, capsys):
    (tmp_path / "folder.wav").mkdir()
    for argv, message in [
        ([str(tmp_path / "missing.wav")], "missing.wav: not found, expected a prompt (audio file or code file)"),
        ([str(tmp_path / "folder.wav")], "folder.wav: is a directory, expected a prompt (audio file or code file)"),
        ([], "give at least one PROMPT, or --state-in"),
        (["--state-in", str(tmp_path / "none.safetensors")], "none.safetensors: not found, expected a generation state"),
        (["--state-in", str(tmp_path)], ": is a directory, expected a generation state file"),
    ]:
        assert main(["generate", *argv, "--out", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    # a code the model does not have is named by the prompt file, not by where its codes came from
    wide = save_codes(tmp_path / "wide.safetensors", Recording(torch.full((8, 3), 4000), silence=torch.zeros(8),
                                                               source="synthetic:0:0"))
    assert main(["generate", str(wide), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-audio"]) == 2
    err = capsys.readouterr().err
    assert f"{wide}: audio code 4000 is out of range" in err and "synthetic" not in err, err


@pytest.fixture
def code_prompt(tmp_path):
    """A code file prompt (3 frames, with silence codes) for the random Mimi's card."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "b.safetensors"
    save_codes(path, Recording(torch.randint(0, 2048, (8, 3), generator=g),
                               silence=torch.randint(0, 2048, (8,), generator=g)))
    return path


@pytest.mark.parametrize("outputs,message", [
    (["--out", "{file}"], "--out: {file} is a file, expected a folder"),
    (["--out", "{file}/sub"], "--out: cannot write into {file}/sub (Not a directory)"),
    (["--state-out", "{tmp}/state"], "--state-out: {tmp}/state is a folder, expected a file name"),
    (["--state-out", "{file}/x.safetensors"], "--state-out (its folder): {file} is a file, expected a folder"),
    (["--state-out", "{tmp}/out/b.safetensors"], "--state-out: {tmp}/out/b.safetensors would overwrite a prompt "
                                                 "or an output of this run"),
    (["--state-out", "{prompt}"], "--state-out: {prompt} would overwrite a prompt"),
    (["--out", "{tmp}"], "--out: writing {prompt} would overwrite an input"),
    (["--out", "{tmp}/taken"], "--out: {tmp}/taken/b.wav is a folder, expected to write a file there"),
])
def test_cli_checks_every_output_before_loading_the_model(tmp_path, code_prompt, capsys, monkeypatch,
                                                          outputs, message):
    """A path the results cannot be written to fails in a second (exit 2, one line naming the option),
    not after the whole generation: the model is never loaded."""
    def no_model(*args):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr("ttt_speech.generation.loading.load_generation_model", no_model)
    (tmp_path / "file").write_text("")
    (tmp_path / "state").mkdir()
    (tmp_path / "taken" / "b.wav").mkdir(parents=True)
    fill = {"tmp": str(tmp_path), "file": str(tmp_path / "file"), "prompt": str(code_prompt)}
    argv = [a.format(**fill) for a in outputs]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main(["generate", str(code_prompt), *argv]) == 2
    err = capsys.readouterr().err
    assert message.format(**fill) in err and len(err.strip().splitlines()) == 1, err


def test_a_prompt_that_cannot_be_read_leaves_no_output_folder(tmp_path, capsys):
    """The outputs are checked first but created only once the run has succeeded: a prompt that fails
    to decode (after the model loaded) leaves neither --out nor the --state-out folder behind."""
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    out, state = tmp_path / "new" / "out", tmp_path / "states" / "s.safetensors"
    assert main(["generate", str(bad), "--out", str(out), "--state-out", str(state), "--device", "cpu",
                 "--max-duration", "0.16"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: cannot decode audio" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.wav"]


def test_an_export_of_other_codes_is_one_line_before_audio_is_read(tmp_path, capsys):
    """An export of a model trained on 64 codes (as `ttt-speech train tiny`'s) with an audio prompt:
    the codebooks' mismatch with Mimi is named, not a code "out of range" of the encoded prompt."""
    from ttt_speech.export import save_export

    config = ModelConfig(name="tiny", device="cpu", tiny=SMALL)
    export = save_export(load_lm(config), config, tmp_path / "small", trainable="full")
    prompt = tmp_path / "p.wav"
    sf.write(prompt, np.zeros(4800, dtype=np.float32), 24000)
    assert main(["generate", str(prompt), "--export", str(export), "--out", str(tmp_path / "out"),
                 "--max-duration", "0.16", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the model's {CARD}-code audio codebooks do not match Mimi's 2048" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- sessions

def run(lm, prompts, n, config=SAMPLING, batch=None):
    with GenerationSession(lm, batch or len(prompts), config, SILENCE) as session:
        return list(session.run(prompts, n))


def test_greedy_generation_is_deterministic(lm):
    prompts = [random_streams(6, 1)]
    a = run(lm, prompts, 8, GenerationConfig(temperature=0, text_temperature=0, seed=1))
    b = run(lm, prompts, 8, GenerationConfig(temperature=0, text_temperature=0, seed=2))  # seed plays no part
    assert torch.equal(codes_of(a)[0], codes_of(b)[0]) and codes_of(a)[0].shape == (9, 8)


def test_seed_fixes_sampling(lm):
    prompts = [random_streams(6, 1)]
    a, b = run(lm, prompts, 8), run(lm, prompts, 8)
    c = run(lm, prompts, 8, GenerationConfig(**{**SAMPLING.__dict__, "seed": 8}))
    assert torch.equal(codes_of(a)[0], codes_of(b)[0])
    assert not torch.equal(codes_of(a)[0], codes_of(c)[0])


def test_prompt_frames_are_forced_and_rows_start_their_continuation_together(lm):
    """Echoed prompt frames equal the prompts (the delays are undone exactly); prompts of
    different lengths are end-aligned, so all rows generate from the same step on."""
    prompts = [random_streams(7, 1), random_streams(3, 2)]
    frames = run(lm, prompts, 5)
    for i, p in enumerate(prompts):
        echo = codes_of(frames, include_prompt=True)[i][:, :p.shape[1]]
        assert torch.equal(echo, p[:9])
        assert codes_of(frames)[i].shape == (9, 5)
    first_generated = [min(f.step for f in frames if f.generated[i]) for i in range(2)]
    assert first_generated[0] == first_generated[1] == 7 + max(lm.delays) + 1
    assert all(f.emitted.all() for f in frames if f.generated.any())


@pytest.mark.parametrize("ttt", [True, False])
def test_generate_save_resume_equals_one_uninterrupted_generation(tmp_path, ttt):
    lm = small_lm(ttt=ttt)
    prompts = [random_streams(6, 1), random_streams(4, 2)]
    whole = run(lm, prompts, 14)
    with GenerationSession(lm, 2, SAMPLING, SILENCE) as session:
        first = list(session.run(prompts, 9))
        save_state(tmp_path / "state.safetensors", session)
    tensors, meta = read_state(tmp_path / "state.safetensors")
    assert any(k.startswith("ttt.") for k in tensors) == ttt
    assert {"gen.cache", "gen.offsets", "gen.offset_cpu", "session.rng",
            "lm.transformer.layers.0.self_attn.kv_cache.cache"} <= set(tensors)
    with GenerationSession(lm, 2, SAMPLING, SILENCE) as session:
        load_state(tmp_path / "state.safetensors", session)
        second = list(session.run(None, 5))
    for i in range(2):
        joined = torch.cat([codes_of(first)[i], codes_of(second)[i]], dim=1)
        assert torch.equal(joined, codes_of(whole)[i]), i


def test_resume_with_a_new_prompt_and_other_settings(lm):
    """A second prompt on a live stream: the frames already begun come first, then the prompt,
    then the continuation; a saved stream resumed the same way gives the same frames."""
    p1, p2 = random_streams(5, 1), random_streams(4, 3)
    greedy = GenerationConfig(temperature=0, text_temperature=0)
    with GenerationSession(lm, 1, SAMPLING, SILENCE) as session:
        list(session.run([p1], 3))
        saved = session.state_dict()
        session.config = greedy
        live = list(session.run([p2], 4))
    with GenerationSession(lm, 1, greedy, SILENCE) as session:
        load_state(saved, session)
        resumed = list(session.run([p2], 4))
    out = codes_of(live, include_prompt=True)[0]
    assert out.shape == (9, max(lm.delays) + 4 + 4)
    assert torch.equal(out[:, max(lm.delays):max(lm.delays) + 4], p2[:9])
    assert torch.equal(out, codes_of(resumed, include_prompt=True)[0])


def test_state_mismatches_are_clear_errors(lm, tmp_path):
    with GenerationSession(lm, 1, SAMPLING, SILENCE) as session:
        list(session.run([random_streams(3, 1)], 2))
        saved = session.state_dict()
    with GenerationSession(lm, 2, SAMPLING, SILENCE) as session, pytest.raises(ValueError, match="2"):
        load_state(saved, session)
    with GenerationSession(small_lm(seed=1), 1, SAMPLING, SILENCE) as session, \
            pytest.raises(ValueError, match="different model"):
        load_state(saved, session)
    save_codes(tmp_path / "codes.safetensors", Recording(torch.zeros(8, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="not a generation state file"):
        read_state(tmp_path / "codes.safetensors")
    with GenerationSession(lm, 1, SAMPLING, SILENCE) as session, pytest.raises(ValueError, match="prompt 0"):
        list(session.run([torch.zeros(5, 3, dtype=torch.long)], 2))


def test_non_finite_text_logits_stop_the_run_naming_the_step_and_row():
    """NaN text logits in row 1 from the 5th step on: the run stops at step 5, naming row 1's text;
    the same run on the intact model goes through (the check does not fire on good logits)."""
    lm = small_lm(ttt=False)
    prompts = [random_streams(3, 1), random_streams(3, 2)]
    assert len(run(lm, prompts, 4)) == 3 + max(lm.delays) + 4
    calls = []

    def nan_from_step_5(module, inputs, output):
        calls.append(1)
        if len(calls) >= 5:
            output = output.clone()
            output[1] = float("nan")
        return output

    lm.text_linear.register_forward_hook(nan_from_step_5)
    frames = []
    with GenerationSession(lm, 2, SAMPLING, SILENCE) as session, pytest.raises(GenerationDiverged) as e:
        for frame in session.run(prompts, 4):
            frames.append(frame)
    assert len(frames) == 4 and (e.value.step, e.value.where) == (5, [(1, "text")])
    assert "at step 5 of this run" in str(e.value) and "row 1 (text)" in str(e.value)


def test_non_finite_audio_logits_stop_the_run():
    """NaN in the head of codebook 2 (greedy: argmax would take NaN as a token silently)."""
    lm = small_lm(ttt=False)
    greedy = GenerationConfig(temperature=0, text_temperature=0)
    with torch.no_grad():
        lm.linears[2].weight.fill_(float("nan"))
    with GenerationSession(lm, 2, greedy, SILENCE) as session, pytest.raises(GenerationDiverged) as e:
        list(session.run([random_streams(3, 1), None], 4))
    # step 1 already samples codebooks 1-7 of row 0 (delay 1: no prompt token is due for them yet);
    # row 1 (no prompt) waits for row 0's prompt to end: its logits, NaN too, are not sampled
    assert (e.value.step, e.value.where) == (1, [(0, "audio codebook 2")])


def test_stream_api_yields_frames(lm):
    frames = list(stream(lm, [Recording(random_streams(4, 1)[1:9], silence=SILENCE)],
                         GenerationConfig(max_duration=0.4, temperature=0, text_temperature=0)))
    assert codes_of(frames)[0].shape == (9, 5)  # 0.4 s = 5 frames
    assert [f.step for f in frames] == list(range(1, len(frames) + 1))


# ----------------------------------------------------------------------------- audio (random Mimi)

def test_streamed_decoding_in_chunks_equals_one_decode_and_resumes(mimi):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2048, (2, 8, 7), generator=g)
    with torch.no_grad():
        whole = mimi.decode(codes)[:, 0]  # [2, 7·1920]
        alone = mimi.decode(codes[1:, :, :4])[0, 0]

    def frames(lo, hi, rows=(True, True)):
        for t in range(lo, hi):
            yield type("F", (), {"emitted": torch.tensor(rows), "prompt": torch.tensor([False, False]),
                                 "audio": codes[:, :, t]})

    with AudioDecoder(mimi, 2, chunk_frames=3) as dec:
        for f in frames(0, 4):
            dec.push(f)
        with pytest.raises(ValueError, match="flush"):
            dec.state_dict()
        first = dec.pull(flush=True)
        saved = dec.state_dict()
    with AudioDecoder(mimi, 2, chunk_frames=2) as dec:
        dec.load_state_dict(saved)
        for f in frames(4, 7):
            dec.push(f)
        second = dec.pull(flush=True)
    for i in range(2):
        joined = torch.cat([first[i], second[i]])
        assert joined.shape == (7 * mimi.frame_size,)
        assert (joined - whole[i]).abs().max() < 1e-4
    # rows emitting different numbers of frames (exec-masked decoding)
    with AudioDecoder(mimi, 2, chunk_frames=2) as dec:
        for f in frames(0, 4, rows=(False, True)):
            dec.push(f)
        out = dec.pull(flush=True)
    assert out[0].numel() == 0 and (out[1] - alone).abs().max() < 1e-4


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from ttt_speech.export import save_export

    config = ModelConfig(name="tiny", device="cpu", tiny=AUDIO)
    lm = load_lm(config)
    patch_moshi(lm, TTTConfig(mini_batch_size=4))
    return save_export(lm, config, tmp_path_factory.mktemp("export") / "tiny-ttt", trainable="ttt")


def test_cli_generates_audio_and_codes_and_resumes_exactly(tmp_path, export_dir, mimi, capsys):
    """A wav and a code file as one batch; resumed from the saved state == one run (which gets the
    wav's codes as a code file, encoded by the same random Mimi, so it needs no Mimi at all)."""
    pcm = (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(0.4 * 24000)) / 24000)).astype(np.float32)
    sphn.write_wav(str(tmp_path / "a.wav"), pcm, 24000)
    g = torch.Generator().manual_seed(0)
    silence = torch.randint(0, 2048, (8,), generator=g)
    save_codes(tmp_path / "b.safetensors", Recording(torch.randint(0, 2048, (8, 3), generator=g), silence=silence))
    (tmp_path / "codes").mkdir()
    encoded = encode_pcm(mimi, read_audio(tmp_path / "a.wav", 24000))
    # the random Mimi's codes carry the audio (not one code for everything, as moshi's unfitted one)
    assert all(len(set(row.tolist())) > 1 for row in encoded), encoded
    save_codes(tmp_path / "codes" / "a.safetensors", Recording(encoded, silence=silence))
    prompts = [str(tmp_path / "a.wav"), str(tmp_path / "b.safetensors")]
    common = ["--export", str(export_dir), "--device", "cpu", "--seed", "3", "--top-p", "0.9"]
    state = tmp_path / "state.safetensors"
    assert main(["generate", *prompts, "--out", str(tmp_path / "run"), "--max-duration", "0.4",
                 "--state-out", str(state), *common]) == 0
    out = capsys.readouterr().out
    assert "frames/s per stream" in out and "x real time" in out
    assert main(["generate", "--state-in", str(state), "--out", str(tmp_path / "run"), "--max-duration", "0.24",
                 *common]) == 0
    assert main(["generate", str(tmp_path / "codes" / "a.safetensors"), prompts[1], "--out", str(tmp_path / "whole"),
                 "--max-duration", "0.64", "--no-audio", *common]) == 0
    for name, frames in (("a", 5), ("b", 5), ("a.resume1", 3), ("b.resume1", 3)):
        pcm, rate = sphn.read(str(tmp_path / "run" / f"{name}.wav"))
        assert rate == 24000 and pcm.shape == (1, frames * 1920), name
        assert load_codes(tmp_path / "run" / f"{name}.safetensors").codes.shape == (8, frames)
    assert not (tmp_path / "whole" / "a.wav").exists()
    for name in ("a", "b"):
        parts = [load_codes(tmp_path / "run" / f"{n}.safetensors") for n in (name, f"{name}.resume1")]
        whole = load_codes(tmp_path / "whole" / f"{name}.safetensors")
        assert torch.equal(torch.cat([p.codes for p in parts], 1), whole.codes)
        assert torch.equal(torch.cat([p.text for p in parts]), whole.text)


def test_cli_exits_1_and_writes_nothing_when_the_model_diverges(tmp_path, export_dir, code_prompt, capsys):
    """An export whose TTT output projection is NaN: exit 1 (the input was valid), one line naming the
    step, the row and its prompt; no code file, wav or state file of the run. The intact export passes."""
    from ttt_speech.export import save_export

    config = ModelConfig(name="tiny", device="cpu", tiny=AUDIO)
    lm = load_lm(config)
    patch_moshi(lm, TTTConfig(mini_batch_size=4))
    with torch.no_grad():
        lm.transformer.layers[1].ttt_branch.ttt.layer.o_proj.weight.fill_(float("nan"))
    broken = save_export(lm, config, tmp_path / "broken", trainable="ttt")
    common = [str(code_prompt), "--device", "cpu", "--max-duration", "0.16"]
    state = tmp_path / "state.safetensors"
    assert main(["generate", *common, "--export", str(broken), "--out", str(tmp_path / "out"),
                 "--state-out", str(state)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ttt-speech generate: error: the model diverged") and len(err.splitlines()) == 1, err
    assert "at step 1 of this run" in err and "row 0 (text); row 0 is b" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not state.exists()
    assert main(["generate", *common, "--export", str(export_dir), "--out", str(tmp_path / "ok"),
                 "--state-out", str(state)]) == 0
    assert {p.name for p in (tmp_path / "ok").iterdir()} == {"b.safetensors", "b.wav"} and state.is_file()


@pytest.mark.parametrize("ttt", [False, True])
def test_scored_frames_carry_the_nll_that_teacher_forcing_gives_the_same_stream(ttt):
    """`score=True`: each emitted frame's NLL (text + Moshi's codebooks, recorded while sampling, aligned
    through the delays) equals the native teacher-forced NLL of the stream the session made; the
    scored stream is not degenerate, and without `score` frames carry none."""
    from ttt_speech_apps.eval.nll import native_nll

    lm = small_lm(ttt=ttt).eval()
    prompt = random_streams(6, seed=3)
    prompt[1 + lm.dep_q:] = SILENCE[:, None]  # the user's silence, as the session sends it after the prompt
    with torch.no_grad(), GenerationSession(lm, 1, SAMPLING, SILENCE, score=True) as session:
        frames = list(session.run([prompt], num_frames=10))
    made = continuation(frames, include_prompt=True)[0]  # [1 + dep_q, T]: text, Moshi's audio
    assert made.shape[1] == 16 and made[1:, 6:].unique().numel() > 5
    streams = torch.cat([made, SILENCE[:, None].expand(8, made.shape[1])])
    reference = native_nll(lm, streams)
    recorded = torch.stack([f.nll[0] for f in frames if f.emitted[0]], dim=1)  # [1 + dep_q, T]
    generated = slice(6, None)
    scored = reference.mask[:, generated]
    assert scored.sum() > 60 and torch.isfinite(recorded[:, generated][scored]).all()
    torch.testing.assert_close(recorded[:, generated][scored], reference.nll[:, generated][scored],
                               rtol=1e-4, atol=1e-4)
    with torch.no_grad(), GenerationSession(lm, 1, SAMPLING, SILENCE) as session:
        assert all(f.nll is None for f in session.run([prompt], num_frames=2))
