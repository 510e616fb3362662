"""Conversations: chat-template rendering, the loss on the assistant's turns,
too-long rows, ShareGPT rows, answers judged by label, and chatting with a
model from the command line. Tiny random models with a byte-level BPE
tokenizer and ChatML / Llama-3 templates (tests/tiny_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_cli import runner_here as _runner
from tiny_models import (CHATML, CHATML_MARKED, LLAMA3, chat_decoder_dir, chat_tokenizer)

CONVERSATION = [{"role": "system", "content": "you are a helpful bot ."},
                {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "how are you today ?"},
                {"role": "user", "content": "is this tweet negative ?"},
                {"role": "assistant", "content": "negative"}]


def _tokenized(tokenizer, rows, *, max_length=128, **fmt):
    from jaxlora.data import LmFormat, tokenize_lm_batch

    settings = dict(chat=True, messages_column="messages", train_on="assistant") | fmt
    return tokenize_lm_batch({"messages": rows}, tokenizer=tokenizer, fmt=LmFormat(**settings),
                             max_length=max_length, pad_id=tokenizer.pad_token_id,
                             eos_id=tokenizer.eos_token_id)


def _targets(tokenizer, out, row=0) -> str:
    ids, mask = out["input_ids"][row], out["loss_mask"][row]
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


def test_assistant_mask_equals_transformers_generation_markers():
    """On a template with `{% generation %}` markers, the tokens the loss counts
    are exactly transformers' `return_assistant_tokens_mask`, though ours are
    found without the markers (from the rendered text's offsets)."""
    tokenizer = chat_tokenizer(template=CHATML_MARKED)
    reference = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    out = _tokenized(tokenizer, [CONVERSATION])
    n = len(reference["input_ids"])
    assert out["problem"] == [""] and out["input_ids"][0][:n] == reference["input_ids"]
    assert out["loss_mask"][0][:n] == reference["assistant_masks"]
    assert sum(out["attention_mask"][0]) == n and sum(out["loss_mask"][0][n:]) == 0


@pytest.mark.parametrize("template, end", [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>")])
def test_assistant_turns_are_the_targets_on_templates_without_markers(template, end):
    """ChatML and a Llama-3-style template (which trims the content and starts
    with BOS), with a system turn: every assistant turn's content and its
    end-of-turn token are targets, nothing else; `last` keeps the final turn,
    `all` every token."""
    tokenizer = chat_tokenizer(template=template)
    out = _tokenized(tokenizer, [CONVERSATION])
    assert _targets(tokenizer, out) == f"how are you today ?{end}negative{end}"
    last = _tokenized(tokenizer, [CONVERSATION], train_on="last")
    assert _targets(tokenizer, last) == f"negative{end}"
    every = _tokenized(tokenizer, [CONVERSATION], train_on="all")
    assert every["loss_mask"][0] == every["attention_mask"][0]


def test_pairs_through_the_chat_template_with_a_system_prompt():
    """`chat = true` with prompt/response columns: a system turn, the prompt
    through `template` as the user's turn, the response as the assistant's."""
    from jaxlora.data import LmFormat, tokenize_lm_batch

    tokenizer = chat_tokenizer()
    fmt = LmFormat(prompt_column="p", response_column="r", chat=True,
                   template="is this tweet negative or positive ? {prompt}",
                   system_prompt="you are a helpful bot .")
    out = tokenize_lm_batch({"p": ["i love it ."], "r": ["positive"]}, tokenizer=tokenizer,
                            fmt=fmt, max_length=64, pad_id=0, eos_id=tokenizer.eos_token_id)
    text = tokenizer.decode([t for t, a in zip(out["input_ids"][0], out["attention_mask"][0]) if a])
    assert text == ("<|im_start|>system\nyou are a helpful bot .<|im_end|>\n<|im_start|>user\n"
                    "is this tweet negative or positive ? i love it .<|im_end|>\n"
                    "<|im_start|>assistant\npositive<|im_end|>\n")
    assert _targets(tokenizer, out) == "positive<|im_end|>"


def test_too_long_rows_are_dropped_truncated_or_refused():
    """A conversation whose counted turn would be cut does not fit ("drop" and
    "error" tell it by `fits`); "truncate" cuts from the left and keeps the
    answer; a plain text is cut on the right and still fits."""
    tokenizer = chat_tokenizer()
    full = _tokenized(tokenizer, [CONVERSATION])
    n = sum(full["attention_mask"][0])
    short = n - 3  # the last assistant turn is cut
    dropped = _tokenized(tokenizer, [CONVERSATION], max_length=short)
    assert dropped["fits"] == [False] and dropped["truncated"] == [True]
    kept = _tokenized(tokenizer, [CONVERSATION], max_length=short, too_long="truncate")
    assert kept["fits"] == [True] and kept["truncated"] == [True]
    assert kept["input_ids"][0] == full["input_ids"][0][3:n]  # from the left
    assert _targets(tokenizer, kept).endswith("negative<|im_end|>")
    assert _tokenized(tokenizer, [CONVERSATION], max_length=n)["fits"] == [True]

    from jaxlora.data import LmFormat, tokenize_lm_batch

    text = tokenize_lm_batch({"text": ["the cat sat on the mat . " * 4]}, tokenizer=tokenizer,
                             fmt=LmFormat(), max_length=8, pad_id=0, eos_id=2)
    assert text["fits"] == [True] and text["truncated"] == [True]


def test_sharegpt_rows_and_bad_messages():
    """ShareGPT's {from, value} rows read as roles; a row that is not a list of
    role/content objects, an unknown role, or no assistant turn is one message
    saying what is wrong."""
    from jaxlora.data.chat import check_trainable, messages_of

    sharegpt = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"}]
    assert messages_of(sharegpt) == [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello"}]
    for value, expected in [("hi", "expected a list of messages"),
                            ([{"role": "robot", "content": "x"}], "has role 'robot'"),
                            ([{"from": "bot", "value": "x"}], "is from 'bot'"),
                            ([{"role": "user"}], "has no text content"),
                            ([["user", "hi"]], "not an object")]:
        with pytest.raises(ValueError, match=expected):
            messages_of(value)
    with pytest.raises(ValueError, match="no assistant turn"):
        check_trainable([{"role": "user", "content": "hi"}], "assistant")
    check_trainable([{"role": "user", "content": "hi"}], "all")


def test_answers_are_judged_by_the_label_they_name():
    from jaxlora.answers import first_label, judge, normalized

    labels = ["negative", "positive"]
    assert first_label("This tweet is Negative.", labels) == 0
    assert first_label("positive, not negative", labels) == 1
    assert first_label("nonnegative", labels) == -1 and first_label("neutral", labels) == -1
    assert normalized("  Positive!! ") == "positive" and normalized(" . ") == "."
    scores = judge(["Positive.", "no idea", "negative", "negative"],
                   ["positive", "positive", "negative", "positive"], labels)
    assert scores["exact_match"] == 0.5 and scores["accuracy"] == 0.5
    assert scores["answered_no_label"] == 1 and scores["exact_match_examples"] == 4
    assert "examples" not in scores  # the eval set's size stays the evaluation's own
    assert first_label("no answer here", ["no", "no answer"]) == 1  # the longer, at a tie
    assert scores["confusion"] == [[1, 0, 0], [1, 1, 1]]  # the last column: no label named
    assert scores["per_class"]["positive"]["recall"] == pytest.approx(1 / 3)


CHAT_RECIPE = """\
[model]
source = "model"
task = "causal-lm"

[data]
source = "{data}"
{columns}
max_length = 48
eval_size = 8
seed = 0

[adapter]
method = "lora"
rank = 8
targets = "all-linear"

[train]
epochs = 10
batch_size = 8
learning_rate = 1e-2
warmup_ratio = 0.0
log_every = 2

[eval]
batch_size = 8
exact_match_examples = 8
"""


def _sentiment_rows(n=48, seed=0):
    rng = np.random.default_rng(seed)
    good, bad = ["i love it .", "hello there", "the cat sat on the mat ."], \
        ["i hate it .", "the dog ran .", "what is the dog ?"]
    rows = []
    for _ in range(n):
        positive = bool(rng.integers(2))
        text = (good if positive else bad)[rng.integers(3)]
        rows.append({"text": text, "label": "positive" if positive else "negative",
                     "messages": [{"role": "user", "content": f"is this tweet negative or "
                                                              f"positive ? {text}"},
                                  {"role": "assistant",
                                   "content": "positive" if positive else "negative"}]})
    return rows


@pytest.fixture(scope="module")
def chat_workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    chat_decoder_dir(root / "model")
    rows = _sentiment_rows()
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _recipe(root: Path, name: str, columns: str, data: str = "rows.jsonl") -> str:
    (root / f"{name}.toml").write_text(CHAT_RECIPE.format(data=data, columns=columns))
    return f"{name}.toml"


def test_a_conversation_run_with_labels_judges_the_answers_before_and_after(chat_workdir):
    """Conversations rendered with the model's ChatML template, answers judged
    by label: accuracy and macro-F1 before and after, in eval.json, report.md
    and the terminal; then `runner generate` answers with the run's model,
    through the chat template and up to the end of its turn."""
    recipe = _recipe(chat_workdir, "conv", 'chat = true\nlabels = ["negative", "positive"]')
    done = _runner("run", recipe, cwd=chat_workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = (chat_workdir / "runs" / "conv").iterdir()
    evals = json.loads((run / "eval.json").read_text())
    for when in ("before", "after"):
        assert evals[when]["exact_match_examples"] == 8
        assert {"accuracy", "macro_f1", "per_class", "answered_no_label"} <= set(evals[when])
    assert evals["after"]["accuracy"] > evals["before"]["accuracy"]
    assert evals["after"]["answered_no_label"] < evals["before"]["answered_no_label"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["label_counts"]["train"]["positive"] > 0
    report = (run / "report.md").read_text()
    assert "| accuracy |" in report and "answers naming no label" in report
    assert "accuracy" in done.stdout
    # `runner eval` judges the answers again: exact match and the labels they name
    again = _runner("eval", str(run), cwd=chat_workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    [written] = (run / "evals").iterdir()
    metrics = json.loads(written.read_text())["metrics"]
    for key in ("exact_match", "accuracy", "macro_f1", "answered_no_label"):
        assert metrics[key] == pytest.approx(evals["after"][key]), key
    assert "exact match" in again.stdout and "answers naming no label" in again.stdout

    said = _runner("generate", str(run.relative_to(chat_workdir)), "--prompt",
                   "is this tweet negative or positive ? i love it .", "--json",
                   cwd=chat_workdir)
    assert said.returncode == 0, said.stderr[-2000:]
    row = json.loads(said.stdout.strip().splitlines()[-1])
    assert row["completion"] == "positive" and row["stopped_at_eos"]


def test_runner_chat_keeps_the_conversation(chat_workdir, monkeypatch):
    """`runner chat`: each stdin line a user turn, each answer printed, the
    conversation kept; an empty line ends it."""
    import io

    recipe = _recipe(chat_workdir, "talk", "chat = true")
    lines = b"is this tweet negative or positive ? i hate it .\nhello there\n\nignored\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    done = _runner("chat", recipe, "--max-new-tokens", "4", cwd=chat_workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.rstrip("\n").split("\n")  # a random model's answer may hold \x1c
    assert len(lines) == 2 and all(line.startswith("assistant:") for line in lines), lines


def test_sharegpt_conversations_and_the_too_long_count(chat_workdir):
    """ShareGPT rows train like role/content ones; rows whose answer cannot fit
    max_length are dropped and counted in the manifest, report and terminal."""
    rows = _sentiment_rows(40, seed=1)
    for i, row in enumerate(rows):
        row["conversations"] = [{"from": "human" if m["role"] == "user" else "gpt",
                                 "value": m["content"]} for m in row["messages"]]
        if i % 10 == 0:  # a long user turn: the answer falls past max_length
            row["conversations"][0]["value"] = "the cat sat on the mat . " * 12
    (chat_workdir / "sharegpt.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = _recipe(chat_workdir, "share", 'chat = true\nmessages_column = "conversations"',
                     data="sharegpt.jsonl")
    done = _runner("run", recipe, "--set", "train.epochs=1", cwd=chat_workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = (chat_workdir / "runs" / "share").iterdir()
    data = json.loads((run / "manifest.json").read_text())["data"]
    assert sum(data["too_long"].values()) == 4
    assert data["train_size"] + data["eval_size"] == 36
    assert "too long for max_length, dropped" in " ".join(done.stdout.split())
    assert "would not fit max_length" in (run / "report.md").read_text()
    refused = _runner("run", recipe, "--fresh", "--set", "data.too_long=error", cwd=chat_workdir)
    assert refused.returncode == 2 and "is cut by max_length 48" in refused.stderr


@pytest.mark.parametrize("row, expected", [
    ({"messages": []}, "data row 3 of split 'train', column 'messages' (messages_column): "
                       "expected a list of messages"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "has role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn to learn"),
])
def test_bad_conversations_are_one_message_naming_the_row(chat_workdir, row, expected):
    rows = [{"messages": CONVERSATION[1:3]}] * 2 + [row] + [{"messages": CONVERSATION}] * 9
    (chat_workdir / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = _recipe(chat_workdir, "bad", "chat = true", data="bad.jsonl")
    done = _runner("run", recipe, cwd=chat_workdir)
    assert done.returncode == 2 and expected in " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stderr and not (chat_workdir / "runs" / "bad").exists()


def test_a_template_that_fails_or_reorders_is_one_message_naming_the_row(chat_workdir):
    (chat_workdir / "broken.jinja").write_text("{{ raise_exception('not for chats') }}")
    recipe = _recipe(chat_workdir, "tmpl", 'chat = true\nchat_template = "broken.jinja"')
    done = _runner("run", recipe, cwd=chat_workdir)
    assert done.returncode == 2 and "rows.jsonl: data row 1 of split 'train': the chat " \
        "template fails on it (not for chats)" in " ".join(done.stderr.split()), done.stderr
    # a template that writes a conversation's start otherwise than as a prefix
    (chat_workdir / "reordered.jinja").write_text("{{ messages | reverse | list }}")
    recipe = _recipe(chat_workdir, "order", 'chat = true\nchat_template = "reordered.jinja"')
    done = _runner("run", recipe, cwd=chat_workdir)
    assert done.returncode == 2 and "its assistant turns cannot be found in the text" in \
        " ".join(done.stderr.split()), done.stderr
    missing = _recipe(chat_workdir, "nofile", 'chat = true\nchat_template = "nowhere.jinja"')
    done = _runner("run", missing, cwd=chat_workdir)
    assert done.returncode == 2 and "neither a Jinja template nor a readable file" in done.stderr


def test_packing_keeps_conversations_apart():
    """Packed training rows hold whole conversations one after another: each its
    own segment, positions restarting, its targets where they were."""
    import numpy as np

    from jaxlora.data import Split, pack

    tokenizer = chat_tokenizer()
    rows = [CONVERSATION[1:3], CONVERSATION, CONVERSATION[3:]]
    out = _tokenized(tokenizer, rows, max_length=64)
    split = Split(input_ids=np.array(out["input_ids"], np.int32),
                  attention_mask=np.array(out["attention_mask"], np.int32),
                  labels=np.zeros(3, np.int32), loss_mask=np.array(out["loss_mask"], np.int32))
    packed = pack(split)
    lengths = split.attention_mask.sum(1)
    for row in range(len(packed.input_ids)):
        segments = packed.segment_ids[row]
        for segment in set(segments[segments > 0].tolist()):
            where = segments == segment
            assert (packed.positions[row][where] == np.arange(where.sum())).all()
    # every conversation's tokens and targets survive packing, in order
    kept = packed.attention_mask.astype(bool)
    assert kept.sum() == lengths.sum()
    assert packed.loss_mask[kept].sum() == split.loss_mask.sum()


def test_chat_data_for_a_model_without_a_chat_template_is_refused(tmp_path):
    from tiny_models import qa_rows, tiny_decoder_dir

    tiny_decoder_dir(tmp_path / "model", "llama-gqa-rope3")  # a word-level tokenizer, no template
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in qa_rows(20)) + "\n")
    recipe = _recipe(tmp_path, "pairs", 'prompt_column = "prompt"\nresponse_column = "response"\n'
                                        "chat = true", data="qa.jsonl")
    done = _runner("run", recipe, cwd=tmp_path)
    assert done.returncode == 2 and "data.chat: the model's tokenizer has no chat template" \
        in " ".join(done.stderr.split()), done.stderr


OWN_SYSTEM = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nyou are a "
              "helpful bot .<|im_end|>\n' }}{% endif %}" + CHATML)
SPACED = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ 'user: ' + "
          "message['content'] + '\n' }}{% else %}{{ 'assistant: ' + message['content'] + "
          "'<|im_end|>\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def test_masks_with_a_template_of_its_own_system_turn_an_opening_answer_and_a_spaced_prompt():
    """A template that writes its own system turn (as SmolLM2's does), a
    conversation that opens with the assistant's turn, and a generation prompt
    ending in a space (so the answer's first token, " positive", starts inside
    the template's text): the answer is learned whole each time."""
    tokenizer = chat_tokenizer(template=OWN_SYSTEM)
    out = _tokenized(tokenizer, [CONVERSATION[1:]])
    assert _targets(tokenizer, out) == "how are you today ?<|im_end|>negative<|im_end|>"
    opening = [{"role": "assistant", "content": "hello there"}] + CONVERSATION[1:3]
    out = _tokenized(tokenizer, [opening])
    assert out["problem"] == [""]
    assert _targets(tokenizer, out) == "hello there<|im_end|>how are you today ?<|im_end|>"
    spaced = chat_tokenizer(template=SPACED)
    out = _tokenized(spaced, [CONVERSATION[3:]])
    ids = [t for t, m in zip(out["input_ids"][0], out["loss_mask"][0]) if m]
    assert spaced.decode(ids) == " negative<|im_end|>"  # the space is the word's


def test_truncate_cuts_a_pair_from_the_left_and_nothing_left_is_refused(tmp_path):
    from jaxlora.data import DataConfig, LmFormat, tokenize_lm_batch
    from jaxlora.data.rows import SplitRows
    from jaxlora.data.tokenize import fitting_rows
    from jaxlora.errors import UserError

    tokenizer = chat_tokenizer()
    fmt = LmFormat(prompt_column="p", response_column="r", too_long="truncate")
    batch = {"p": ["the cat sat on the mat . " * 6], "r": ["positive"]}
    out = tokenize_lm_batch(batch, tokenizer=tokenizer, fmt=fmt, max_length=12, pad_id=0,
                            eos_id=tokenizer.eos_token_id)
    assert out["fits"] == [True] and out["truncated"] == [True]
    assert _targets(tokenizer, out) == "positive<|im_end|>"  # the response kept whole
    assert tokenizer.decode(out["input_ids"][0]).endswith(". positive<|im_end|>")

    import datasets

    ds = datasets.Dataset.from_dict({"p": batch["p"] * 3, "r": batch["r"] * 3})
    cfg = DataConfig(source="x", prompt_column="p", response_column="r", max_length=12,
                     eval_size=1)
    part = SplitRows(ds, np.arange(3), np.zeros(3, np.int32), "train")
    with pytest.raises(UserError, match="no row of split 'train' fits max_length 12"):
        fitting_rows(part, tokenizer, cfg, Path("d.jsonl"), fmt=LmFormat.of(cfg))


def test_runner_chat_keeps_the_conversation_a_system_turn_and_resets(chat_workdir, monkeypatch):
    """Each turn the model sees the whole conversation so far after --system;
    /reset starts it again; generate --chat shows a prompt as a user's turn,
    and --chat with --raw is refused."""
    import io

    from runner.speaker import Speaker

    recipe = _recipe(chat_workdir, "seen", "chat = true")
    seen, chat_ids = [], Speaker.chat_ids

    def recorded(self, messages):
        seen.append([m["role"] for m in messages])
        return chat_ids(self, messages)

    monkeypatch.setattr(Speaker, "chat_ids", recorded)
    lines = b"hello there\nis this tweet negative ?\n/reset\ni love it .\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    done = _runner("chat", recipe, "--system", "you are a helpful bot .", "--max-new-tokens",
                   "2", cwd=chat_workdir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"],
                    ["system", "user"]]
    plain = _recipe(chat_workdir, "plain", 'prompt_column = "text"\nresponse_column = "label"')
    seen.clear()
    said = _runner("generate", plain, "--chat", "--prompt", "i love it .", "--max-new-tokens",
                   "2", cwd=chat_workdir)
    assert said.returncode == 0 and seen == [["user"]], said.stderr[-2000:]
    with pytest.raises(SystemExit) as refused:  # argparse's own refusal
        _runner("generate", plain, "--chat", "--raw", "--prompt", "x", cwd=chat_workdir)
    assert refused.value.code == 2
