"""Supervised examples as token tensors: the loss sees only the response, never prompt or padding."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from .errors import fail

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


def encode_example(row: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, where: str = "") -> dict:
    """prompt + " " + answer + EOS; labels are -100 over the prompt. A prompt too long for the
    context is cut from the left so the answer (what is learned) always survives."""
    prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(row["prompt"] + " " + row["answer"], add_special_tokens=False)["input_ids"]
    full_ids = full_ids + [tokenizer.eos_token_id]
    # BPE may merge across the prompt/answer boundary: mask the longest shared prefix only.
    cut = 0
    while cut < min(len(prompt_ids), len(full_ids) - 1) and prompt_ids[cut] == full_ids[cut]:
        cut += 1
    answer_len = len(full_ids) - cut
    if answer_len >= max_length:
        fail(f"{where or 'example'}: answer is {answer_len} tokens, longer than max_length {max_length}")
    overflow = max(0, len(full_ids) - max_length)
    input_ids = full_ids[overflow:]
    labels = [IGNORE_INDEX] * (cut - overflow) + full_ids[cut:]
    return {"input_ids": input_ids, "labels": labels}


def encode_rows(rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, task: str = "",
                encode: Callable[..., dict] = encode_example) -> list[dict]:
    """Every row through ``encode(row, tokenizer, max_length, where)`` (a method may bring its own:
    CIMEO's pretraining form learns every token)."""
    return [encode(row, tokenizer, max_length, f"task '{task}' row {row.get('id', i)}") for i, row in enumerate(rows)]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions get attention 0 and label -100
    (pad is EOS for SmolLM2, so padding must never be learned as a real EOS)."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[i, :n] = torch.tensor(example["input_ids"])
        labels[i, :n] = torch.tensor(example["labels"])
        attention[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batch_order(n_examples: int, batch_size: int, n_batches: int, seed: int) -> list[list[int]]:
    """Indices of each global batch: reshuffled every epoch from (seed, epoch), so the order is
    a pure function of its arguments and a resumed run sees exactly the batches it would have."""
    order: list[int] = []
    epoch = 0
    while len(order) < n_batches * batch_size:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order.extend(torch.randperm(n_examples, generator=generator).tolist())
        epoch += 1
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


@torch.no_grad()
def response_loss(model: torch.nn.Module, encoded: list[dict], pad_id: int, batch_size: int = 16) -> float:
    """Mean cross-entropy per response token over ``encoded`` (the quantity SFT minimises)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[start:start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        total += losses.item()
        count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = model
    while hasattr(inner, "get_base_model") or hasattr(inner, "module"):  # peft / DDP wrappers
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner.module
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens, as ``model(**batch).loss``, but the LM head
    (49k-way on SmolLM2) runs only at the positions that predict a label: responses are a few
    tokens of each row, so this skips most of the head's matmul and softmax in both passes."""
    labels = batch["labels"]
    if not _accepts_logits_to_keep(model):
        return model(**batch).loss
    positions = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # position t predicts t+1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=positions).logits.float()
    targets = labels[:, positions + 1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def encode_chat(row: dict, tokenizer, max_length: int, where: str = "") -> dict:
    """Chat-template SFT: user turn = prompt, assistant turn = answer, rendered by the tokenizer's
    own chat template (SmolLM2's adds its default system turn). Labels cover the assistant turn
    (answer + end-of-turn token) only; what the template writes after the end-of-turn token (a
    newline) is dropped. Too long a prompt is cut from the left so the answer always survives."""
    if not getattr(tokenizer, "chat_template", None):
        fail(f"{where or 'example'}: the tokenizer has no chat template; chat-template training "
             "needs one (train with --no-chat_template)")
    user = [{"role": "user", "content": row["prompt"]}]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["answer"]}], tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full_ids[:len(prompt_ids)] != prompt_ids:
        fail(f"{where or 'example'}: the chat template's assistant turn does not extend its generation prompt")
    eos = tokenizer.eos_token_id
    ends = [i for i in range(len(prompt_ids), len(full_ids)) if full_ids[i] == eos]
    if ends:
        full_ids = full_ids[:ends[-1] + 1]
    else:  # a template whose end-of-turn is not the EOS token: close the answer with EOS
        full_ids = full_ids + [eos]
    answer_len = len(full_ids) - len(prompt_ids)
    if answer_len >= max_length:
        fail(f"{where or 'example'}: answer is {answer_len} tokens, longer than max_length {max_length}")
    overflow = max(0, len(full_ids) - max_length)
    return {"input_ids": full_ids[overflow:],
            "labels": [IGNORE_INDEX] * (len(prompt_ids) - overflow) + full_ids[len(prompt_ids):]}
