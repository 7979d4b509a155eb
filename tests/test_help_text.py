"""Words that must not mislead (issue 23): the command lines' --help, and no false tokenizer warning in training.
No network; the data test needs ../shared/tokenizer."""
import json
import os

import pytest

from conftest import HAVE_TOKENIZER, TOKENIZER_DIR


def help_text(parse_args, capsys) -> str:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    return capsys.readouterr().out


def test_train_help_keeps_its_examples_line_breaks(capsys):
    """`train.py --help` showed its example commands with runs of spaces where the backslash line breaks were."""
    import train

    text = help_text(train.parse_args, capsys)
    assert "--data ../shared/corpus/train.jsonl \\\n        --val-data" in text
    assert not [line for line in text.splitlines() if "\\" in line and "  " * 8 in line.split("\\")[0].strip()]


def test_convert_help_shows_defaults_and_defaults_to_the_better_init(capsys):
    """`convert_smollm2.py --help` showed no defaults, and its default --moe-init was the one its README rates worse
    (fitted: loss 4.81 before training vs 4.33 dense-equivalent)."""
    import convert_smollm2

    args = convert_smollm2.parse_args(["--out", "x", "--calibration", "c.jsonl"])
    assert args.moe_init == "dense-equivalent"
    text = "".join(help_text(convert_smollm2.parse_args, capsys).split())  # argparse wraps anywhere, "dense-" too
    for shown in ["(default: dense-equivalent)", "(default: 8192)", "(default: 256)", "(default: 0)",
                  "default: config_smollm2_135.yaml"]:
        assert shown.replace(" ", "") in text, shown
    assert "(default:None)" not in text and "(default:False)" not in text


@pytest.mark.skipif(not HAVE_TOKENIZER, reason=f"needs the SmolLM2 tokenizer at {TOKENIZER_DIR}")
def test_training_data_gives_no_false_indexing_errors_warning(tmp_path, monkeypatch, capfd):
    """Every training run printed transformers' "Token indices sequence length is longer than the specified maximum
    sequence length ... will result in indexing errors": documents are packed and cut into seq_len windows, so it
    is not true."""
    import data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "word " * 10_000}) + "\n")  # 10k tokens > model_max_length 8192
    tokenizer = data.load_tokenizer(TOKENIZER_DIR)  # a fresh tokenizer: transformers warns once per instance
    tokens = data.tokenize_files([str(path)], tokenizer)
    assert len(tokens) > 8192
    err = capfd.readouterr().err
    assert "indexing errors" not in err and "Token indices" not in err, err
