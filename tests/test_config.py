"""TTTConfig: validation with field-naming errors, YAML round-trip, layer selection."""
import pytest
import yaml

from ttt_speech import TTTConfig


@pytest.mark.parametrize("field,value,match", [
    ("mini_batch_size", 0, r"TTTConfig.mini_batch_size: expected an integer >= 1"),
    ("mini_batch_size", -3, r"TTTConfig.mini_batch_size"),
    ("mini_batch_size", 2.5, r"TTTConfig.mini_batch_size"),
    ("layer_type", "rnn", r"TTTConfig.layer_type: expected one of \['linear', 'mlp', 'e2e_mlp'\]"),
    ("mode", "parallel", r"TTTConfig.mode: expected one of \['replace', 'hybrid'\]"),
    ("num_heads", 0, r"TTTConfig.num_heads"),
    ("base_lr", -1.0, r"TTTConfig.base_lr"),
    ("base_lr", float("nan"), r"TTTConfig.base_lr"),
    ("layers", "last:0", r"TTTConfig.layers: fraction in 'last:f' must be in \(0, 1\]"),
    ("layers", "last:1.5", r"TTTConfig.layers: fraction"),
    ("layers", "every:0", r"TTTConfig.layers: expected 'all', a list"),
    ("layers", "some", r"TTTConfig.layers"),
    ("layers", [], r"TTTConfig.layers"),
    ("layers", [1, "2"], r"TTTConfig.layers"),
    ("checkpoint_group_size", -1, r"TTTConfig.checkpoint_group_size"),
    ("output_gate", "yes", r"TTTConfig.output_gate"),
])
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        TTTConfig(**{field: value})


def test_unknown_yaml_key_is_an_error():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['minibatch'\]"):
        TTTConfig.from_dict({"minibatch": 16})


def test_yaml_round_trip():
    text = "layer_type: mlp\nmini_batch_size: 8\nlayers: last:0.25\nmode: replace\n"
    cfg = TTTConfig.from_dict(yaml.safe_load(text))
    assert cfg.base_lr == 0.1  # the MLP default
    again = TTTConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("spec,depth,expected", [
    ("all", 4, [0, 1, 2, 3]),
    ([0, -1], 4, [0, 3]),
    ("every:2", 6, [1, 3, 5]),
    ("every:1", 3, [0, 1, 2]),
    ("last:0.25", 32, [24, 25, 26, 27, 28, 29, 30, 31]),
    ("last:0.5", 3, [1, 2]),
    ("last:0.01", 4, [3]),
])
def test_layer_selection(spec, depth, expected):
    assert TTTConfig(layers=spec).resolve_layers(depth) == expected


def test_layer_selection_errors():
    with pytest.raises(ValueError, match="out of range"):
        TTTConfig(layers=[5]).resolve_layers(4)
    with pytest.raises(ValueError, match="duplicate"):
        TTTConfig(layers=[1, -3]).resolve_layers(4)
    with pytest.raises(ValueError, match="selects no layer"):
        TTTConfig(layers="every:5").resolve_layers(4)


def test_shipped_yaml_config_loads():
    cfg = TTTConfig.from_yaml("configs/ttt_linear_hybrid.yaml", key="ttt")
    assert cfg.layers == "last:0.25" and cfg.resolve_layers(32) == list(range(24, 32))


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ttt:\n  mode: sideways\n")
    with pytest.raises(ValueError, match=r"bad.yaml: TTTConfig.mode"):
        TTTConfig.from_yaml(bad, key="ttt")
    with pytest.raises(ValueError, match=r"missing.yaml: cannot read"):
        TTTConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"no 'model' section"):
        TTTConfig.from_yaml(bad, key="model")


def test_every_config_field_is_documented():
    """docs/ttt_layer.md's config reference and the shipped YAML name every TTTConfig field."""
    from dataclasses import fields
    readme = open("docs/ttt_layer.md").read()
    shipped = open("configs/ttt_linear_hybrid.yaml").read()
    for f in fields(TTTConfig):
        if f.repr:
            assert f"`{f.name}`" in readme, f.name
            assert f"{f.name}:" in shipped, f.name


def test_the_one_chunk_rule():
    from ttt_speech.config import resolve_chunk_size

    linear, e2e = TTTConfig(mini_batch_size=16), TTTConfig(layer_type="e2e_mlp", mini_batch_size=16)
    assert [resolve_chunk_size(None, c) for c in (linear, e2e, None)] == [64, 64, 64]
    assert resolve_chunk_size(None, TTTConfig(mini_batch_size=25)) == 100  # 4 mini-batches
    assert resolve_chunk_size(7, linear) == 7 and resolve_chunk_size(7, None) == 7  # TTT layers take any chunk
    assert resolve_chunk_size(48, e2e) == 48
    with pytest.raises(ValueError, match=r"eval.chunk_size: 24 frames is not a multiple of the E2E mini-batch size \(16\)"):
        resolve_chunk_size(24, e2e, "eval.chunk_size")
    assert resolve_chunk_size(24, e2e, frames=20) == 24  # one chunk holds the whole stream
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size: expected a positive number of frames"):
            resolve_chunk_size(bad, linear)
