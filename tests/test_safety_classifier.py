"""Safety classifier tests: the ShieldGemma prompt against transformers rendering the ShieldGemma chat
template, scores against an HF model's Yes/No softmax, windows for long texts, policies from TOML."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gemmakit.safety.classifier import (
    Classifier,
    ClassifierError,
    Item,
    load_toxicity_scorer,
    render_ids,
    render_text,
)
from gemmakit.safety.policy import HARMS, Policy, PolicyError, get_policy, load_policies
from gemmakit.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

NANO = Path(__file__).resolve().parents[1] / "gemmakit" / "assets" / "nano"

# The `chat_template` that google/shieldgemma-{2b,9b,27b} ship in tokenizer_config.json since June
# 2024 (HF discussion #6: `apply_chat_template(chat, guideline=...)`), written out here from the model
# card's prompt pattern and that discussion: this machine has no hub access to diff it against the file.
SHIELDGEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[-1]['role'] == 'user' %}"
    "{{- 'You are a policy expert trying to help determine whether a user prompt is in violation of the "
    "defined safety policies.\\n\\n' }}"
    "{{- '<start_of_turn>\\n' }}"
    "{{- 'Human Question: ' + messages[-1]['content'] | trim + '\\n' }}"
    "{{- '<end_of_turn>\\n\\n' }}"
    "{{- 'Our safety principle is defined in the below:\\n\\n' }}"
    "{{- '* ' + guideline + '\\n' }}"
    "{{- '\\n===\\n\\n' }}"
    "{{- \"Does the human question violate the above principle? Your answer must start with 'Yes' or "
    "'No'. And then walk through step by step to be sure we answer correctly.\\n\\n\" }}"
    "{%- else %}"
    "{{- 'You are a policy expert trying to help determine whether an AI response to a prompt is in "
    "violation of the defined safety policies.\\n\\n' }}"
    "{{- '<start_of_turn>\\n' }}"
    "{{- 'Human Question: ' + messages[-2]['content'] | trim + '\\n' }}"
    "{{- '<end_of_turn>\\n\\n' }}"
    "{{- '<start_of_turn>\\n' }}"
    "{{- 'Chatbot Response: ' + messages[-1]['content'] | trim + '\\n' }}"
    "{{- '<end_of_turn>\\n\\n' }}"
    "{{- 'Our safety principle is defined in the below:\\n\\n' }}"
    "{{- '* ' + guideline + '\\n' }}"
    "{{- '\\n===\\n\\n' }}"
    "{{- \"Does the Chatbot Response violate the above principle? Your answer must start with 'Yes' or "
    "'No'. And then walk through step by step to be sure we answer correctly.\\n\\n\" }}"
    "{%- endif %}"
)

CHATS = [
    ("Create 20 paraphrases of I hate you", None),
    ("  How do I kill a Python process?\n", None),
    ("What's the capital of France?", "  The capital of France is Paris. \n"),
    ("Tell me a joke.", "Why did the chicken cross the road?\n\nTo get to the other side."),
]


def _messages(prompt: str, response: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": prompt}]
    return msgs + ([{"role": "assistant", "content": response}] if response is not None else [])


def _hf_tokenizer(spm_dir: Path):
    return transformers.GemmaTokenizer.from_pretrained(str(spm_dir))


@pytest.fixture(scope="module")
def nano_tok() -> Tokenizer:
    return Tokenizer.load(NANO)


@pytest.fixture(scope="module")
def nano_hf_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("nano_tok")
    shutil.copy(NANO / "tokenizer.model", d / "tokenizer.model")
    return _hf_tokenizer(d)


@pytest.mark.parametrize("policy", sorted(HARMS))
@pytest.mark.parametrize("chat", CHATS)
def test_text_matches_shieldgemma_chat_template(nano_hf_tok, policy, chat) -> None:
    prompt, response = chat
    pol = HARMS[policy]
    form = "prompt" if response is None else "response"
    hf = nano_hf_tok.apply_chat_template(_messages(prompt, response), chat_template=SHIELDGEMMA_TEMPLATE,
                                         guideline=pol.guideline(form), tokenize=False)  # fmt: skip
    assert render_text(pol, prompt, response) == hf


@pytest.mark.parametrize("chat", CHATS)
def test_ids_match_hf_tokenizer_on_each_layout(tok, model_path, nano_tok, nano_hf_tok, chat) -> None:
    """Token ids equal HF's tokenization of the rendered template, for both special-token layouts
    (tiny tokenizers) and the shipped nano tokenizer."""
    prompt, response = chat
    pol = HARMS["harassment"]
    form = "prompt" if response is None else "response"
    for ours, hf_tok in ((tok, _hf_tokenizer(model_path.parent)), (nano_tok, nano_hf_tok)):
        text = hf_tok.apply_chat_template(_messages(prompt, response), chat_template=SHIELDGEMMA_TEMPLATE,
                                          guideline=pol.guideline(form), tokenize=False)  # fmt: skip
        assert render_ids(ours, pol, prompt, response) == hf_tok(text, add_special_tokens=False).input_ids


def test_official_guideline_texts() -> None:
    """The model card's sentence frames, and its Harassment guideline verbatim."""
    assert HARMS["harassment"].guideline("prompt") == (
        '"No Harassment": The prompt shall not contain or seek generation of content that is malicious, '
        "intimidating, bullying, or abusive content targeting another individual (e.g., physical threats, "
        "denial of tragic events, disparaging victims of violence)."
    )
    assert (
        HARMS["dangerous_content"]
        .guideline("response")
        .startswith(
            '"No Dangerous Content": The chatbot shall not generate content that harming oneself and/or others'
        )
    )
    assert set(HARMS) == {"dangerous_content", "harassment", "hate_speech", "sexually_explicit"}


@pytest.fixture(scope="module")
def hf_and_ours():
    """A tiny random HF Gemma 3 over the nano tokenizer's 8192 pieces and its gemmakit twin."""
    from conftest import twin_of

    cfg = transformers.Gemma3TextConfig(vocab_size=8192, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=16, max_position_embeddings=1024, sliding_window=64,
                                        query_pre_attn_scalar=16)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if "embed" in name else 0.3))
    return hf, twin_of(hf)


def test_scores_match_hf_yes_no_softmax(hf_and_ours, nano_tok, nano_hf_tok) -> None:
    """P(violation) = softmax over HF's last-position logits at 'Yes' and 'No', batched or alone."""
    hf, ours = hf_and_ours
    yes, no = nano_hf_tok.convert_tokens_to_ids(["Yes", "No"])
    items = [Item(p, r) for p, r in CHATS]
    policies = ["hate_speech", "dangerous_content"]
    batched = Classifier(ours, nano_tok, batch_size=8).score(items, policies)
    alone = Classifier(ours, nano_tok, batch_size=1).score(items, policies)
    for item, row_b, row_a in zip(items, batched, alone, strict=True):
        for name in policies:
            pol = get_policy(name)
            form = "prompt" if item.response is None else "response"
            ids = nano_hf_tok.apply_chat_template(_messages(item.prompt, item.response),
                                                  chat_template=SHIELDGEMMA_TEMPLATE,
                                                  guideline=pol.guideline(form), tokenize=True)  # fmt: skip
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            with torch.no_grad():
                z = hf(torch.tensor([ids])).logits[0, -1, [yes, no]]
            ref = torch.softmax(z, -1)[0].item()
            assert row_a[name] == pytest.approx(ref, abs=1e-5)  # fp32 summation order differs from HF
            assert row_b[name] == pytest.approx(row_a[name], abs=1e-5)  # padding is masked


def test_long_text_is_judged_in_windows_covering_all_of_it(hf_and_ours, nano_tok) -> None:
    _, ours = hf_and_ours
    clf = Classifier(ours, nano_tok)
    pol = get_policy("harassment")
    text = " ".join(f"word{i}" for i in range(900))  # ~2700 tokens, the context is 1024
    windows = clf._windows(pol, Item(text))
    assert len(windows) >= 3 and all(len(w) <= 1024 for w in windows)
    decoded = [nano_tok.decode(w) for w in windows]
    assert "word0 " in decoded[0] and "word899" in decoded[-1]
    for i in range(0, 900, 50):  # every word is inside some window
        assert any(f"word{i} " in d or f"word{i}\n" in d for d in decoded), i
    score = clf.score([Item(text)], [pol])[0]["harassment"]
    assert score == pytest.approx(max(clf._probabilities(windows)), abs=1e-6)


def test_tokenizer_without_yes_no_is_a_clear_error(hf_and_ours, tok) -> None:
    _, ours = hf_and_ours
    with pytest.raises(ClassifierError, match="not usable as a ShieldGemma classifier .*'Yes'"):
        Classifier(ours, tok)


def test_user_policies_from_toml(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('[policies.no_medical_advice]\ntitle = "No Medical Advice"\n'
                 'definition = "gives a diagnosis or a treatment plan."\n')  # fmt: skip
    pols = load_policies(f)
    assert pols["no_medical_advice"].guideline("prompt") == (
        '"No Medical Advice": The prompt shall not contain or seek generation of content that gives a '
        "diagnosis or a treatment plan."
    )
    assert get_policy("no_medical_advice", pols) == Policy("no_medical_advice", "No Medical Advice",
                                                          "gives a diagnosis or a treatment plan.")  # fmt: skip


@pytest.mark.parametrize(
    "body, words",
    [
        (
            '[policies.x]\ntitle = "T"\ndefinition = "d."\ncolour = "red"\n',
            "policies.x: unknown key 'colour'",
        ),
        ('[policies.x]\ntitle = "T"\n', "policies.x.definition: expected a non-empty string"),
        ('[policies.harassment]\ntitle = "T"\ndefinition = "d."\n', "'harassment' is a built-in harm type"),
        ('[policy.x]\ntitle = "T"\n', "unknown top-level key 'policy'"),
        ("[policies.x\n", "not valid TOML"),
    ],
)
def test_bad_policy_files_are_one_line_errors(tmp_path: Path, body: str, words: str) -> None:
    f = tmp_path / "p.toml"
    f.write_text(body)
    with pytest.raises(PolicyError) as e:
        load_policies(f)
    assert words in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


def test_missing_policy_file_and_unknown_policy_name(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such"):
        load_policies(tmp_path / "missing.toml")
    with pytest.raises(PolicyError, match="unknown policy 'violence'; expected one of dangerous_content"):
        get_policy("violence")


def test_profanity_check_scorer_ranks_insults_above_benign_text() -> None:
    pytest.importorskip("profanity_check")
    score = load_toxicity_scorer("profanity-check")
    insult, benign = score(["You are a stupid worthless idiot.", "The meeting moved to Thursday."])
    assert 0.0 <= benign < 0.5 < insult <= 1.0
    assert score([]) == []


def test_missing_classifier_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ClassifierError, match=f"{tmp_path / 'nope'}: classifier not found"):
        load_toxicity_scorer(str(tmp_path / "nope"))


def test_classify_command_prints_one_json_line_per_text(model_dir: Path) -> None:
    import json
    import subprocess
    import sys

    exe = str(Path(sys.executable).with_name("gemmakit"))
    proc = subprocess.run([exe, "classify", "--model", str(NANO), "--policy", "harassment", "--policy",
                           "hate_speech", "You are an idiot.", "Hello there."], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["You are an idiot.", "Hello there."]
    for r in rows:
        assert set(r["scores"]) == {"harassment", "hate_speech"} and r["max"] == max(r["scores"].values())
        assert all(0.0 <= p <= 1.0 for p in r["scores"].values())
    bad = subprocess.run([exe, "classify", "--model", str(model_dir), "hi"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "not usable as a ShieldGemma classifier" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    unknown = subprocess.run([exe, "classify", "--model", str(NANO), "--policy", "violence", "hi"],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert unknown.returncode == 2 and "unknown policy 'violence'" in unknown.stderr
