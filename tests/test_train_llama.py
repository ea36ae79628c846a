"""`ttt-speech train` for host llama (`model.host: llama`): tiny Llama / Qwen2 models on token streams.

The window forward with the state carried through `TTTCache` is pinned to one full pass; training
runs, uses the carried state, resumes bit for bit (stages too), runs on 2 ranks as on one, and
exports what a fresh transformers model loads and generates from."""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from test_distributed import assert_close, torchrun  # noqa: E402
from train_utils import read_trainable  # noqa: E402
from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.data.synthetic import SynthConfig, write_corpus  # noqa: E402
from ttt_speech.llama import TTTCache, patch_llama, tiny_llm  # noqa: E402
from ttt_speech.llama.carry import CacheCarry  # noqa: E402
from ttt_speech_apps.finetune.cli import main as train_main  # noqa: E402
from ttt_speech_apps.finetune.llama_host import PAD, chunked_nll, stream_nll  # noqa: E402

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def losses(run: Path) -> dict[int, float]:
    """step → training loss (eval rows left out)."""
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def token_corpus(root: Path, recordings: int = 10, frames: int = 48) -> dict:
    return write_corpus(SynthConfig(recordings=recordings, frames=frames, length_jitter=0.0, eval_frames=None,
                                    card=60, num_motifs=2, motif_frames=4, eval_recordings=2), root / "tokens", tokens=True)


def llama_config(root: Path, corpus: dict, name: str = "tiny-llama", **overrides) -> Path:
    import yaml

    config = {"model": {"host": "llama", "name": name, "tiny": dict(TINY) if name in ("tiny-llama", "tiny-qwen2") else {},
                        "device": "cpu"},
              "ttt": {"layer_type": "linear", "mode": "hybrid", "mini_batch_size": 4, "gate_init": 1.0},
              "data": {"train_manifest": str(corpus["train"]), "window_frames": 8, "batch_size": 4},
              "trainable": "full", "optim": {"lr": 3e-3, "schedule": "constant"},
              "steps": 6, "log_every": 1, "output_dir": str(root / "run"), "wandb": {"mode": "disabled"}}
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "config.yaml"


def test_windows_carried_through_the_cache_equal_one_full_pass():
    """All layers TTT (replace: no attention to cut at window edges): windows of 8 tokens with the state
    carried by `CacheCarry` give one full pass's logits, and a restart gives a fresh stream's."""
    torch.manual_seed(0)
    model = tiny_llm("qwen2", **TINY)
    patch_llama(model, TTTConfig(layer_type="linear", mode="replace", layers="all", mini_batch_size=4))
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        carry = CacheCarry(model, 2)
        parts = []
        for start in range(0, 24, 8):
            carry.next_window(torch.tensor([start == 0, start == 0]))
            cache = carry.window_cache()
            parts.append(model(input_ids=ids[:, start:start + 8], cache=cache, use_cache=True).logits)
            carry.window_ended(cache)
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5), float((torch.cat(parts, 1) - full).abs().max())
        assert not torch.allclose(parts[1], model(input_ids=ids[:, 8:16]).logits, atol=1e-3)  # the state matters
        carry.next_window(torch.tensor([True, False]))  # row 0 restarts: a fresh stream
        cache = carry.window_cache()
        again = model(input_ids=ids[:, :8], cache=cache, use_cache=True).logits
        assert torch.allclose(again[0], full[0, :8], atol=1e-5) and not torch.allclose(again[1], full[1, :8], atol=1e-3)


def test_the_chunked_loss_equals_the_whole_windows():
    """The loss without the window's logits (output layer + cross-entropy 7 rows at a time, recomputed in
    backward): the whole window's loss and gradients; PAD targets count nothing."""
    g = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(30, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (30,), generator=g)
    targets[25:] = PAD
    whole = torch.nn.functional.cross_entropy(head(hidden), targets, ignore_index=PAD, reduction="sum")
    grads = torch.autograd.grad(whole, [hidden, head.weight])
    chunked = chunked_nll(hidden, targets, head, chunk=7)
    assert torch.allclose(chunked, whole, rtol=1e-6) and whole > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(torch.autograd.grad(chunked, [hidden, head.weight]), grads))
    with torch.no_grad():
        assert torch.allclose(chunked_nll(hidden, targets, head, chunk=4), whole, rtol=1e-6)


def test_chunked_stream_nll_equals_one_pass():
    """Length generalisation's scorer (one TTTCache, `chunk` tokens per forward) is chunking-invariant."""
    model = tiny_llm("llama", **TINY)
    patch_llama(model, TTTConfig(layer_type="linear", mode="hybrid", layers="all", mini_batch_size=4, gate_init=1.0))
    ids = torch.randint(3, 128, (41,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        one, chunked = stream_nll(model, ids, 64), stream_nll(model, ids, 6)
    assert one.shape == (40,) and abs(one - chunked).max() < 1e-5 and one.std() > 0.01


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_models_train_and_use_the_carried_state(tmp_path, name):
    """The loss falls; without persistent state the first step (every row starts its stream) is the same
    and the later ones differ: the carried state is what changes them."""
    corpus = token_corpus(tmp_path)
    config = llama_config(tmp_path / "a", corpus, name, steps=12, length_gen={"num_lengths": 3, "max_factor": 4},
                          **{"data.eval_manifest": str(corpus["eval"])})
    assert train_main([str(config), "--quiet"]) == 0
    run = tmp_path / "a" / "run"
    loss = losses(run)
    assert loss[12] < loss[1] - 0.3, loss
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in rows) and (run / "length_gen" / "length_gen.json").is_file()
    assert json.loads((run / "length_gen" / "length_gen.json").read_text())["trained"]["groups"]["tokens"]["points"]
    fresh = llama_config(tmp_path / "b", corpus, name, steps=12, persistent_state=False)
    assert train_main([str(fresh), "--quiet"]) == 0
    other = losses(tmp_path / "b" / "run")
    assert other[1] == loss[1] and all(other[s] != loss[s] for s in range(3, 13)), (loss, other)
    meta = json.loads((run / "export" / "model.json").read_text())
    assert meta["model"]["host"] == "llama" and meta["model"]["name"] == name and meta["ttt"]


@pytest.mark.parametrize("name, trainable", [("tiny-llama", "ttt"), ("tiny-qwen2", "ttt+lora")])
def test_resume_is_bit_for_bit(tmp_path, name, trainable):
    corpus = token_corpus(tmp_path)
    common = {"trainable": trainable, "ttt.gate_init": 0.5}
    whole = llama_config(tmp_path / "whole", corpus, name, steps=8, **common)
    assert train_main([str(whole), "--quiet"]) == 0
    half = llama_config(tmp_path / "half", corpus, name, steps=3, **common)
    assert train_main([str(half), "--quiet"]) == 0
    assert train_main([str(half), "steps=8", "--resume", str(tmp_path / "half" / "run"), "--quiet"]) == 0
    a, b = (read_trainable(tmp_path / p / "run" / "checkpoints" / "step_000008") for p in ("whole", "half"))
    assert set(a) == set(b) and any("lora" in k for k in a) == (trainable == "ttt+lora")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "whole" / "run") == losses(tmp_path / "half" / "run")


def test_stages_resume_at_a_boundary_bit_for_bit(tmp_path):
    """Two stages (windows 8 then 16, rows 4 then 2): uninterrupted == the first stage alone, then resumed
    with the second added; the stage is on every metrics row."""
    corpus = token_corpus(tmp_path)
    stages = [{"name": "short", "steps": 3}, {"name": "long", "steps": 3, "window_frames": 16, "batch_size": 2}]
    whole = llama_config(tmp_path / "whole", corpus, stages=stages)
    assert train_main([str(whole), "--quiet"]) == 0
    first = llama_config(tmp_path / "cut", corpus, steps=3, stages=stages[:1])
    assert train_main([str(first), "--quiet"]) == 0
    assert train_main([str(whole), f"output_dir={tmp_path / 'cut' / 'run'}", "--resume",
                       str(tmp_path / "cut" / "run"), "--quiet"]) == 0
    a, b = (read_trainable(tmp_path / p / "run" / "checkpoints" / "step_000006") for p in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["short"] * 3 + ["long"] * 3


def test_export_loads_into_a_fresh_transformers_model_and_generates(tmp_path):
    """A base checkpoint folder: the export's TTT weights patch a fresh `AutoModelForCausalLM` to the
    trained model exactly, and `generate()` carries the state in a TTTCache."""
    from transformers import AutoModelForCausalLM

    from ttt_speech import load_ttt
    from ttt_speech.export import Export

    base = tmp_path / "base"
    tiny_llm("llama", **TINY).save_pretrained(base)
    corpus = token_corpus(tmp_path)
    config = llama_config(tmp_path / "t", corpus, str(base), trainable="ttt")
    assert train_main([str(config), "--quiet"]) == 0
    export = tmp_path / "t" / "run" / "export"
    trained, _ = Export.open(export).load(torch.device("cpu"))
    fresh = AutoModelForCausalLM.from_pretrained(base)
    load_ttt(fresh, export)
    ids = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, trained(input_ids=ids).logits)
        plain = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
        assert not torch.allclose(fresh(input_ids=ids).logits, plain, atol=1e-4)  # the TTT layers act
        cache = TTTCache(fresh)
        out = fresh.generate(ids, cache=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 18) and cache.ttt_state(0) is not None
    saved = load_file(str(export / "ttt.safetensors"))
    assert saved and all("ttt" in k for k in saved)


def test_text_files_are_tokenized_with_the_models_tokenizer_and_cached(tmp_path, monkeypatch):
    """A hub id read offline from the HF cache (a tiny Qwen2.5-style model with its tokenizer): .txt
    streams are tokenized once into the cache, which a second run reads."""
    from conftest import go_offline
    from make_local_judges import cache_as_hub, make_qwen2  # scripts/, on sys.path by conftest

    cache_as_hub(make_qwen2(tmp_path / "qwen"), tmp_path / "hf-cache", "local/qwen2-text")
    go_offline(monkeypatch, tmp_path / "hf-cache")
    base = "local/qwen2-text"
    texts = tmp_path / "texts"
    texts.mkdir()
    words = "the cat sat on the mat while a dog ran past the red door and the bird sang".split()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        (texts / f"t{i}.txt").write_text(" ".join(words[j] for j in torch.randint(0, len(words), (80,), generator=g)))
    (texts / "train.jsonl").write_text("".join(json.dumps({"path": f"t{i}.txt"}) + "\n" for i in range(4)))
    corpus = {"train": texts / "train.jsonl"}
    cache = tmp_path / "cache"
    config = llama_config(tmp_path / "q", corpus, str(base), steps=2, **{"data.codes_cache": str(cache)})
    assert train_main([str(config), "--quiet"]) == 0
    cached = sorted((cache / "tokens").glob("*.npy"))
    assert len(cached) == 4
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert train_main([str(config), "output_dir=" + str(tmp_path / "q" / "again"), "--quiet"]) == 0
    assert [p.stat().st_mtime_ns for p in sorted((cache / "tokens").glob("*.npy"))] == stamps
    assert losses(tmp_path / "q" / "run") == losses(tmp_path / "q" / "again")


def test_bf16_trains_bf16_weights_with_a_float32_state(tmp_path):
    """precision bf16 on a bf16 model: float32 master copies train, the carried TTT state is float32,
    and the export holds the model's dtype."""
    corpus = token_corpus(tmp_path)
    config = llama_config(tmp_path / "b", corpus, "tiny-qwen2", steps=3, precision="bf16", trainable="ttt+lora",
                          **{"model.dtype": "bfloat16"})
    assert train_main([str(config), "--quiet"]) == 0
    run = tmp_path / "b" / "run"
    carried = load_file(str(run / "checkpoints" / "step_000003" / "carry.safetensors"))
    assert carried and all(t.dtype in (torch.float32, torch.int64, torch.int32) for t in carried.values())
    assert any(t.dtype == torch.float32 and t.dim() >= 3 for t in carried.values())
    trained = read_trainable(run / "checkpoints" / "step_000003")
    assert all(t.dtype == torch.float32 for t in trained.values())
    exported = load_file(str(run / "export" / "ttt.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert len(set(losses(run).values())) == 3


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_ranks_match_one_process(tmp_path, strategy):
    corpus = token_corpus(tmp_path)
    common = {"distributed": strategy, "steps": 4, "trainable": "ttt+lora" if strategy == "fsdp" else "full"}
    single = llama_config(tmp_path / "single", corpus, **common)
    if strategy == "fsdp":  # the 2 ranks recompute their layers in backward (FSDP re-gathers them): the same losses
        common["gradient_checkpointing"] = True
    assert train_main([str(single), "--quiet"]) == 0
    multi = llama_config(tmp_path / "multi", corpus, **common)
    out = torchrun(multi)
    assert out.stdout.count("done:") == 1, out.stdout
    diff = assert_close(losses(tmp_path / "single" / "run"), losses(tmp_path / "multi" / "run"), 1e-4)
    print(f"{strategy} 2 ranks vs 1 process (host llama): max relative loss diff {diff:.2e}")
    assert (tmp_path / "multi" / "run" / "export" / "ttt.safetensors").is_file()


@pytest.mark.parametrize("override, message", [
    (["model.name=tiny-gpt"], "model.name: 'tiny-gpt'"),
    (["ttt.layer_type=e2e_mlp"], "ttt.layer_type: e2e_mlp is implemented for Moshi only"),
    (["trainable=e2e-meta"], "trainable: model.host llama trains"),
    (["model.tiny.vocab_size=20"], "token ids must lie in [0, 20)"),
    (["model.tiny.heads=2"], "model.tiny: unknown kwarg(s) ['heads']"),
    (["data.window_seconds=2"], "data.window_seconds: model.host llama reads token streams"),
])
def test_bad_llama_configs_fail_in_one_line_before_the_output_folder(tmp_path, capsys, override, message):
    corpus = token_corpus(tmp_path)
    config = llama_config(tmp_path / "c", corpus)
    assert train_main([str(config), *override, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "c" / "run" / "export").exists()


def test_a_text_file_needs_a_tokenizer(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some words")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "a.txt"}) + "\n" + json.dumps({"path": "a.txt"}) + "\n")
    config = llama_config(tmp_path / "c", {"train": tmp_path / "m.jsonl"}, **{"data.batch_size": 2})
    assert train_main([str(config), "--quiet"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "a.wav"}) + "\n")
    assert train_main([str(config), "--quiet"]) == 2
    assert "expected token ids (.npy" in capsys.readouterr().err


def test_bad_streams_and_models_fail_in_one_line(tmp_path, capsys, monkeypatch):
    """A one-token stream, a window longer than every stream, a folder of another architecture, a hub id
    missing from the cache: one line each, exit 2, before step 1."""
    import numpy as np

    from conftest import go_offline

    go_offline(monkeypatch, tmp_path / "empty-cache")
    corpus = token_corpus(tmp_path)
    np.save(tmp_path / "tokens" / "one.npy", np.array([5], dtype=np.int32))
    (tmp_path / "tokens" / "m.jsonl").write_text(corpus["train"].read_text() + json.dumps({"path": "one.npy"}))
    config = llama_config(tmp_path / "c", {"train": tmp_path / "tokens" / "m.jsonl"})
    cases = [([], "holds nothing to train on (0 tokens; a token stream needs at least 2 tokens)"),
             ([f"data.train_manifest={corpus['train']}", "data.window_frames=64"],
              "data.window_frames: 64 tokens is longer than every recording"),
             (["model.name=nobody/no-such-model", "model.tiny={}"], "config.json of hub repo nobody/no-such-model is not in the local cache")]
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cases.append(([f"model.name={gpt}", "model.tiny={}"], "is a 'gpt2'; model.host llama trains Llama and Qwen2"))
    for override, message in cases:
        assert train_main([str(config), *override, "--quiet"]) == 2, override
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c" / "run").exists()


def test_moshi_commands_refuse_a_llama_export_in_one_line(tmp_path):
    from ttt_speech.generation.loading import check_generation_model
    from ttt_speech.publish import model_card
    from ttt_speech.export import Export

    corpus = token_corpus(tmp_path)
    config = llama_config(tmp_path / "t", corpus, steps=1, trainable="ttt")
    assert train_main([str(config), "--quiet"]) == 0
    export = tmp_path / "t" / "run" / "export"
    for kwargs in ({"export": export, "ttt": None}, {"export": None, "ttt": export}):
        with pytest.raises(ValueError, match="model.host llama"):
            check_generation_model(**kwargs)
    card = model_card(Export.open(export))
    assert "llama-omni" in card and "Moshi" not in card and "tiny-llama (random-init" in card


@pytest.mark.parametrize("mode", ["hybrid", "replace"])
def test_checkpointed_layers_give_the_same_gradients(mode):
    """`checkpoint_layers`: a window with carried and restarting rows, one of them padded, has the same loss
    and gradients with its decoder layers recomputed in backward (TTT state and token mask set back for the
    recomputation) as without."""
    from ttt_speech.llama import checkpoint_layers

    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    results = []
    for checkpointed in (False, True):
        model = tiny_llm("llama", **TINY)
        torch.manual_seed(0)  # the TTT layers' init
        patch_llama(model, TTTConfig(layer_type="linear", mode=mode, layers="last:0.5", mini_batch_size=4,
                                     gate_init=1.0))
        model.train()
        if checkpointed:
            checkpoint_layers(model)
        carry = CacheCarry(model, 2)
        for start in (0, 8):  # the second window carries row 1 and restarts row 0
            carry.next_window(torch.tensor([True, start == 0]))
            cache = carry.window_cache()
            mask = torch.ones(2, 8, dtype=torch.long)
            mask[1, 5:] = 0  # row 1's stream ends inside the second window
            logits = model(input_ids=ids[:, start:start + 8], attention_mask=mask if start else None, cache=cache,
                           use_cache=True).logits
            carry.window_ended(cache)
        loss = torch.nn.functional.cross_entropy(logits[:, :5].flatten(0, 1), ids[:, 9:14].flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b) and ga.keys() == gb.keys() and any("ttt" in n for n in ga)
    worst = max(float((ga[n] - gb[n]).abs().max()) for n in ga)
    assert worst <= 1e-6, worst


def test_a_llama_omni_checkpoint_folder_trains_its_llm(tmp_path):
    """A folder laid out as LLaMA-Omni's (Omni config fields, projector tensors in the weights): its LLM
    loads with the base weights (the speech weights left aside) and trains."""
    from safetensors.torch import save_file

    from ttt_speech.llama import tiny_omni
    from ttt_speech.export import Export

    omni = tiny_omni("llama", **TINY)
    folder = tmp_path / "omni"
    omni.llm.save_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights.update({f"model.speech_projector.{k}": v.contiguous() for k, v in omni.projector.state_dict().items()})
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="omni_speech_llama", architectures=["OmniSpeechLlamaForCausalLM"],
                  speech_encoder_type="whisper", speech_encoder_ds_rate=2, speech_encoder_hidden_size=32)
    (folder / "config.json").write_text(json.dumps(config))
    corpus = token_corpus(tmp_path)
    path = llama_config(tmp_path / "t", corpus, str(folder), steps=2, trainable="ttt", **{"ttt.gate_init": 0.0})
    assert train_main([str(path), "--quiet"]) == 0
    trained, _ = Export.open(tmp_path / "t" / "run" / "export").load(torch.device("cpu"))
    ids = torch.randint(3, 60, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # gate 0 after 2 steps of lr 3e-3: close to the base LLM, whose weights were read
        assert torch.allclose(trained(input_ids=ids).logits, omni.llm(input_ids=ids).logits, atol=0.1)
        assert not torch.allclose(tiny_llm("llama", seed=1, **TINY)(input_ids=ids).logits, omni.llm(input_ids=ids).logits,
                                  atol=0.1)


def test_checkpointing_refuses_what_would_silently_lose_the_state():
    """checkpoint_layers before patch_llama, transformers' own checkpointing on top, a cache that keeps KV:
    one-line errors; a model without TTT, trained with the default use_cache, recomputes without a cache."""
    from ttt_speech.llama import checkpoint_layers

    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    early = tiny_llm("llama", **TINY)
    checkpoint_layers(early)
    with pytest.raises(ValueError, match="patch first, then call checkpoint_layers"):
        patch_llama(early, TTTConfig(layer_type="linear", mini_batch_size=4))
    early.train()
    early(input_ids=ids, labels=ids).loss.backward()  # baseline: use_cache=True by default, no KV kept twice
    assert early.model.embed_tokens.weight.grad is not None
    model = tiny_llm("llama", **TINY)
    patch_llama(model, TTTConfig(layer_type="linear", mini_batch_size=4, gate_init=1.0))
    checkpoint_layers(model)
    model.train()
    with pytest.raises(ValueError, match="keeps keys and values"):
        model(input_ids=ids, cache=TTTCache(model), use_cache=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # the stack's own cache keeps no KV
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="transformers' gradient checkpointing is on too"):
        model(input_ids=ids, cache=TTTCache(model, keep_kv=False), use_cache=True)
    window = TTTCache(model, keep_kv=False)
    window.crop(0)
    window.batch_select_indices(torch.tensor([0]))


def test_a_meta_build_has_the_buffers_of_a_loaded_one(tmp_path):
    """FSDP ranks > 0 build the model on the meta device and receive rank 0's buffers: same dtypes (RoPE's
    float32 inv_freq of a bf16 model) and names; another architecture is refused from config.json alone."""
    from ttt_speech.llama.loading import check_llm, load_llm
    from ttt_speech.models import ModelConfig

    tiny_llm("qwen2", **TINY).save_pretrained(tmp_path / "q")
    config = ModelConfig(host="llama", name=str(tmp_path / "q"), dtype="bfloat16")
    real, meta = load_llm(config, torch.device("cpu")), load_llm(config, torch.device("meta"))
    buffers = {n: b.dtype for n, b in real.named_buffers()}
    assert buffers and buffers == {n: b.dtype for n, b in meta.named_buffers()}
    assert {p.dtype for p in meta.parameters()} == {torch.bfloat16}
    raw = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**raw, "model_type": "qwen2_moe"}))
    with pytest.raises(ValueError, match="is a 'qwen2_moe'"):
        check_llm(ModelConfig(host="llama", name=str(tmp_path / "q")))
