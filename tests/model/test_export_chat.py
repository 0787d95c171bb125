"""`mujina-model export` writes the project's chat template (issue 19, item 11): an export serves as a
synthetic-data teacher without editing files. The reference for the template is data_shards/chat.py's
render_chat, which built the training data: the template's tokens must be the same turn for turn."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import mujina_model

CONVERSATION = [{"role": "system", "content": "あなたは親切な先生です。"},
                {"role": "user", "content": "今日の天気について教えてください。"},
                {"role": "assistant", "content": "晴れの一日になるでしょう。"},
                {"role": "user", "content": "明日は?"}]


@pytest.fixture(scope="module")
def project_export(tmp_path_factory):
    """A debug checkpoint with the project's SentencePiece tokenizer (data_shards), exported."""
    import torch

    from data_shards.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.transformer import Transformer
    from tests.data_shards.corpus import japanese_documents

    root = tmp_path_factory.mktemp("export-chat")
    tok_dir = root / "tok"
    train_tokenizer(japanese_documents(60, seed=4), tok_dir, TokenizerTrainConfig(vocab_size=1200, mecab=False,
                                                                                 threads=1))
    vocab = Tokenizer(tok_dir).vocab_size
    torch.manual_seed(0)
    save_checkpoint(root / "ckpt", Transformer(ModelConfig.from_dict({"preset": "debug", "vocab_size": vocab})),
                    tokenizer_dir=tok_dir)
    out = mujina_model("export", "--checkpoint", str(root / "ckpt"), "--out", str(root / "hf")).stdout
    assert "with its tokenizer and a chat template" in out
    return root


def test_the_template_renders_turns_as_the_training_data_does(project_export):
    from transformers import AutoTokenizer

    from data_shards.chat import render_chat
    from data_shards.tokenizer import Tokenizer

    hf = AutoTokenizer.from_pretrained(project_export / "hf")
    assert hf.chat_template
    ours = Tokenizer(project_export / "tok")
    record = {"messages": CONVERSATION[:3]}
    ids, _ = render_chat(record, ours.encode, ours.marker_ids, bos_id=None, eos_id=None)
    text = hf.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert hf(text, add_special_tokens=False).input_ids == ids.tolist()
    # the generation prompt ends with the assistant marker, where the model learned to answer
    prompt = hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("明日は?<|end|><|assistant|>")
    assert hf(prompt, add_special_tokens=False).input_ids[-1] == ours.marker_ids["assistant"]


def test_an_export_is_a_teacher_the_worker_accepts(project_export):
    from worker.executors.teacher import check_teacher

    assert check_teacher(project_export / "hf") == ""
    # without the template (as exports were before) the worker refuses it, saying why
    conf_path = project_export / "hf" / "tokenizer_config.json"
    bare = project_export / "bare"
    shutil.copytree(project_export / "hf", bare)
    conf = json.loads(conf_path.read_text())
    del conf["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(conf))
    assert "no chat template" in check_teacher(bare)


@pytest.mark.slow  # two CLI subprocesses
def test_a_tokenizer_with_its_own_template_keeps_it(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(40)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    mujina_model("init", "--preset", "debug", "--out", str(tmp_path / "ckpt"))
    fast.save_pretrained(tmp_path / "ckpt" / "tokenizer")
    mujina_model("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"))
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == fast.chat_template


@pytest.mark.slow  # two CLI subprocesses
def test_an_export_without_tokenizer_files_gets_no_tokenizer_config(tmp_path):
    mujina_model("init", "--preset", "debug", "--out", str(tmp_path / "ckpt"))
    out = mujina_model("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")).stdout
    assert not (tmp_path / "hf" / "tokenizer_config.json").exists()
    assert "without tokenizer files" in out and "--prompt-ids" in out
