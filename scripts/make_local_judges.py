#!/usr/bin/env python
"""Tiny random-init stand-ins for the judges of `ttt-speech eval continuation` (eval/judges.py): a
Whisper ASR, a WavLM speaker-verification model and a Qwen2 text LM, each a few hundred kB, written
with `save_pretrained` so that transformers loads them as it loads the real ones. For running the
probe and its tests offline; their outputs are meaningless (random weights), their shapes are not.

    .venv/bin/python scripts/make_local_judges.py runs/judges
    .venv/bin/python scripts/make_local_judges.py runs/judges --hub-cache runs/hf-cache

Each goes to OUT/<name>/ (asr, speaker, text_lm). With `--hub-cache DIR` each is also laid out in DIR
as huggingface_hub lays out its cache, under the repo id of the judge it stands in for
(openai/whisper-large-v3, microsoft/wavlm-base-plus-sv, Qwen/Qwen2.5-0.5B), so that with
HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1 the probe's default judges resolve without a network.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling make_local_checkpoint
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from make_local_checkpoint import cache_as_hub  # noqa: E402

# the repo id each tiny model stands in for (eval/judges.py's defaults, spelled here so that the script
# does not import the app)
REPO_IDS = {"asr": "openai/whisper-large-v3", "speaker": "microsoft/wavlm-base-plus-sv",
            "text_lm": "Qwen/Qwen2.5-0.5B"}
SENTENCES = ["the quick brown fox jumps over the lazy dog",
             "a long conversation needs a memory beyond its attention window",
             "test time training layers learn while they listen to a book",
             "she read the story aloud and he wrote down every word of it",
             "Hello, world! How are you today? I am fine, thank you."]
BPE_VOCAB = 400  # byte-level BPE: the 256 bytes and ~150 merges learnt from SENTENCES
SAMPLE_RATE = 16000  # both audio judges' input rate, as the real ones
# weights this large (the real models' init is 0.02) make the random audio judges' outputs depend on their
# input: a transcript and a voice that change from span to span, not one constant for every input
INIT_STD = 0.5
# Whisper's special tokens after its text vocabulary, in its order (ids matter: the tokenizer finds the
# language token of `xx` at <|startoftranscript|> + 1 + its index in LANGUAGES)
WHISPER_TAIL = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                "<|notimestamps|>"]


def _byte_bpe(extra_special: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on SENTENCES, as GPT-2-style tokenizers (Whisper's,
    Qwen's) take them; `extra_special` tokens come first in the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=extra_special, show_progress=False)
    bpe.train_from_iterator(SENTENCES * 4, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return bpe.get_vocab(), [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _seeded(seed: int, build):
    """build() with torch's RNG seeded and restored after: the same weights on every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_whisper(out: Path, seed: int = 0) -> Path:
    """A 2+2-layer Whisper (d_model 64, 80 mel bins) with a byte-level BPE tokenizer carrying Whisper's
    special tokens and the generation config `generate(language=..., task="transcribe")` reads."""
    from tokenizers import AddedToken
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    vocab, merges = _byte_bpe([])
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)  # adds <|endoftext|> (bos = eos = unk) after the vocab
    specials = ["<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES), *WHISPER_TAIL]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["<|endoftext|>", *specials]}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    assert sot == eot + 1 and ids["<|notimestamps|>"] == len(tokenizer) - 1, "Whisper's special-token order"
    space = tokenizer.convert_tokens_to_ids("Ġ")
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448,
                           pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
                           begin_suppress_tokens=[space, eot], suppress_tokens=[], init_std=INIT_STD)
    model = _seeded(seed, lambda: WhisperForConditionalGeneration(config))
    # the fields of the real checkpoints' generation_config.json that Whisper's generate reads; every token
    # but whole words (" word") and <|endoftext|> is suppressed (the real ones suppress others) so that the
    # random model writes words that the transcript metrics can count
    words = {i for t, i in tokenizer.get_vocab().items() if t.startswith("Ġ") and t[1:].isalpha()}
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, max_length=448,
        begin_suppress_tokens=[space, eot],
        suppress_tokens=[i for i in range(len(tokenizer)) if i not in words and i != eot], is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50, return_timestamps=False)
    model.save_pretrained(out)
    feature_extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out)
    return out


def make_wavlm(out: Path, seed: int = 1) -> Path:
    """A 2-layer WavLMForXVector (hidden 32, 16-dim x-vectors) with wavlm-base-plus-sv's feature
    extractor settings (16 kHz, no normalisation, attention masks) and its group-norm feature encoder."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    config = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(32,) * 7, feat_extract_norm="group", do_stable_layer_norm=False,
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                         tdnn_dim=(32, 32, 32, 32, 64), xvector_output_dim=16, initializer_range=INIT_STD)
    _seeded(seed, lambda: WavLMForXVector(config)).save_pretrained(out)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=False,
                             return_attention_mask=True).save_pretrained(out)
    return out


def make_qwen2(out: Path, seed: int = 2) -> Path:
    """A 2-layer Qwen2ForCausalLM (hidden 32) with a byte-level BPE Qwen2Tokenizer set as Qwen2.5's:
    no BOS token, <|endoftext|> as EOS and padding."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    vocab, merges = _byte_bpe(["<|endoftext|>"])
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    _seeded(seed, lambda: Qwen2ForCausalLM(config)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


MAKERS = {"asr": make_whisper, "speaker": make_wavlm, "text_lm": make_qwen2}


def make_judges(out: Path, hub_cache: Path | None = None) -> dict[str, Path]:
    """Write the three tiny judges into out/<name>/ (asr, speaker, text_lm); their folders. With
    `hub_cache`, each is also laid out there under its REPO_IDS id."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bars
    folders = {}
    with torch.no_grad():
        for name, make in MAKERS.items():
            folders[name] = make(Path(out) / name)
            if hub_cache is not None:
                cache_as_hub(folders[name], Path(hub_cache), REPO_IDS[name])
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the judges into (OUT/asr, OUT/speaker, OUT/text_lm)")
    parser.add_argument("--hub-cache", type=Path, help="also lay them out in this hub-layout cache (HF_HUB_CACHE), "
                                                       "under the default judges' repo ids")
    args = parser.parse_args(argv)
    folders = make_judges(args.out, args.hub_cache)
    for name, folder in folders.items():
        print(f"wrote {folder} ({REPO_IDS[name]}): " + ", ".join(sorted(p.name for p in folder.iterdir())))
    if args.hub_cache is not None:
        print(f"laid out in {args.hub_cache}; use HF_HUB_CACHE={args.hub_cache} HF_HUB_OFFLINE=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
