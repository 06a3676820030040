"""Real trainers on the exports, loaded exactly as the README shows (pipeline/export_formats.py PREFERENCE_DOC) and with
no column changes: TRL's DPOTrainer and RewardTrainer train a few steps on a text-only preference export, in
both styles, on a tiny random causal LM built here offline with the project's own tokenizer.

The tokenizer gets a string-only ChatML template (Qwen2.5's shape: '<|im_start|>' + role + '\\n' + content),
which cannot render list-of-parts content: the conversational export must write plain strings for text rows.
"""
from pathlib import Path

import pytest

from pipeline import export
from tests.synthetic_output import make_output

trl = pytest.importorskip("trl")

REPO = Path(__file__).resolve().parent.parent
STRING_ONLY_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
STEPS = 2


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["generator"]))
    tok.chat_template = STRING_ONLY_CHATML
    return tok


@pytest.fixture(scope="module")
def tiny_lm_dir(tokenizer, tmp_path_factory):
    """A random 2-layer Qwen2 causal LM with the project's tokenizer, saved to a folder (DPOTrainer loads its
    reference model from the model's path)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-lm")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairsel-out")
    make_output(out, n_pairs=48)  # the retrieval subset has text-only queries
    return out


@pytest.fixture(scope="module", params=["conversational", "standard"])
def export_dir(request, source, tmp_path_factory):
    dest = tmp_path_factory.mktemp(f"pref-{request.param}")
    result = export.run(str(source), "preference", str(dest), text_only=True, preference_style=request.param)
    assert result["rows"] >= 4
    return dest


def common_args():
    return dict(max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, bf16=False, dataloader_num_workers=0, max_length=256)


def test_dpo_trainer_trains_on_the_export(export_dir, tokenizer, tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    # --- as the README shows ---
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer
    ds = load_dataset("parquet", data_files=f"{export_dir}/*.parquet", split="train",
                      cache_dir=str(tmp_path / "hf-cache"))
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common_args()),
                         train_dataset=ds, processing_class=tokenizer)
    # ---
    result = trainer.train()
    assert result.global_step == STEPS
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(loss == loss for loss in losses)  # finite, not NaN


def test_reward_trainer_trains_on_the_export(export_dir, tokenizer, tiny_lm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_lm_dir, num_labels=1)
    # --- as the README shows ---
    from datasets import load_dataset
    from trl import RewardConfig, RewardTrainer
    ds = load_dataset("parquet", data_files=f"{export_dir}/*.parquet", split="train",
                      cache_dir=str(tmp_path / "hf-cache"))
    trainer = RewardTrainer(model=reward_model, args=RewardConfig(output_dir=str(tmp_path / "rm"), **common_args()),
                            train_dataset=ds, processing_class=tokenizer)
    # ---
    result = trainer.train()
    assert result.global_step == STEPS
    # prompt and completion read apart: the tokenized text holds "...\nReasoning: RATIONALE" or the chat turns
    sample = tokenizer.decode(trainer.train_dataset[0]["chosen_ids"])
    row = ds[0]
    if isinstance(row["prompt"], str):
        assert sample.startswith(row["prompt"] + row["chosen"]) and "\nReasoning: " in sample
    else:
        assert f"<|im_start|>user\n{row['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n" in sample


def test_a_string_only_template_refuses_list_content(tokenizer):
    """The test above can fail: the template used there does refuse list-of-parts content."""
    with pytest.raises(TypeError, match="can only concatenate str"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}], tokenize=False)


def test_dpo_refuses_an_images_column_on_a_text_model(source, tokenizer, tiny_lm_dir, tmp_path):
    """Why a text-only export has no images column: TRL takes any `images` column for a vision dataset."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    result = export.run(str(source), "preference", str(tmp_path / "with-images"))  # vqa/captions have images
    ds = load_dataset("parquet", data_files=result["files"], split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert "images" in ds.column_names
    with pytest.raises(ValueError, match="vision-related"):
        DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_lm_dir), args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common_args()),
                   train_dataset=ds, processing_class=tokenizer)
