"""Conversations for supervised fine-tuning: a chat template, and token ids with a loss mask.

A conversation is a list of messages {"role": system | user | assistant, "content": str}. The
chat template is a Jinja file in the Hugging Face convention (`messages`, `add_generation_prompt`,
`eos_token`), so the same file is what an exported model's `tokenizer_config.json` carries as
`chat_template`. The shipped one (`data/chat_template.jinja`) renders

  <|user|>\\n{content}\\n<|assistant|>\\n{content}<|endoftext|>

The loss mask marks the tokens the model is trained to produce: each assistant reply, from the
end of the generation prompt (`<|assistant|>\\n`) through the end-of-text token that closes it, so
a fine-tuned model stops where a reply ends. Everything else (system and user text, the role
headers) is context. The spans come from rendering the template incrementally: the text of
messages[:i] with the generation prompt must be a prefix of the text of messages[:i+1], which
holds for any template that renders messages one after another.
"""

from __future__ import annotations

import json
from typing import Dict, List, NamedTuple, Sequence

import jinja2
import jinja2.sandbox
import numpy as np

from sigma_moe_jax.data.tokenizer import EOS_TOKEN, Tokenizer
from sigma_moe_jax.infra import storage

ROLES = ("system", "user", "assistant")
Message = Dict[str, str]


class Example(NamedTuple):
  """One encoded conversation: int32 token ids and their int32 loss mask (1: a target)."""
  tokens: np.ndarray
  loss_mask: np.ndarray


class ChatTemplate:
  """A Jinja chat template, rendered in a sandbox as Hugging Face's `apply_chat_template` does
  (trim_blocks, lstrip_blocks)."""

  def __init__(self, source: str, name: str = "chat template"):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
      self._template = env.from_string(source)
    except jinja2.TemplateError as e:
      raise ValueError(f"{name} is not a valid Jinja template: {e}") from None
    self.source, self.name = source, name

  @classmethod
  def load(cls, path: str) -> "ChatTemplate":
    if not storage.isfile(path):
      raise ValueError(f"chat template file {path!r} does not exist")
    return cls(storage.read_text(path), path)

  def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    try:
      return self._template.render(messages=list(messages),
                                   add_generation_prompt=add_generation_prompt,
                                   eos_token=EOS_TOKEN)
    except jinja2.TemplateError as e:
      raise ValueError(f"{self.name} failed to render: {e}") from None

  def spans(self, messages: Sequence[Message]) -> List[tuple]:
    """(text, is_target) pieces whose concatenation is the rendered conversation."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
      if message["role"] == "assistant":
        prompt = self.render(messages[:i], add_generation_prompt=True)
        if not prompt.startswith(done):
          raise ValueError(f"{self.name} is not incremental: the generation prompt does not "
                           f"extend the text of the messages before it")
        pieces.append((prompt[len(done):], False))
        done = prompt
      text = self.render(messages[:i + 1])
      if not text.startswith(done):
        raise ValueError(f"{self.name} is not incremental: message {i} changes the text of "
                         f"the messages before it")
      pieces.append((text[len(done):], message["role"] == "assistant"))
      done = text
    return [(text, target) for text, target in pieces if text]

  def prompt(self, messages: Sequence[Message]) -> str:
    """The text a model continues to answer as the assistant."""
    return self.render(messages, add_generation_prompt=True)


def messages_of(record, where: str) -> List[Message]:
  """The messages of one JSON record: {"messages": [...]} or {"prompt", "completion"}; one error
  naming `where` for anything else."""
  if isinstance(record, dict) and "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise ValueError(f"{where}: 'messages' must be a non-empty list")
  elif isinstance(record, dict) and "prompt" in record and "completion" in record:
    messages = [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]}]
  else:
    raise ValueError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\", "
                     f"\"completion\"}}")
  for j, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
      raise ValueError(f"{where}: message {j} needs a string 'content'")
    if message.get("role") not in ROLES:
      raise ValueError(f"{where}: message {j} has unknown role {message.get('role')!r} "
                       f"(known: {', '.join(ROLES)})")
  return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str) -> List[tuple]:
  """(where, messages) of every non-blank line of a JSONL(.gz) file of conversations."""
  try:
    with storage.open_file(path, "rt") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError, EOFError) as e:
    raise ValueError(f"cannot read conversation file {path!r}: {e}") from e
  conversations = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: invalid JSON ({e})") from None
    conversations.append((where, messages_of(record, where)))
  if not conversations:
    raise ValueError(f"conversation file {path!r} holds no conversation")
  return conversations


def encode(messages: Sequence[Message], template: ChatTemplate, tokenizer: Tokenizer, *,
           max_len: int, truncate: bool = False, where: str = "conversation") -> Example:
  """Token ids and loss mask of one conversation, each piece of the template encoded on its
  own. Longer than `max_len` tokens: an error, or with `truncate` its first `max_len` tokens.
  A conversation with no target token left is an error either way."""
  tokens, mask = [], []
  for text, target in template.spans(messages):
    ids = tokenizer.encode(text)
    tokens += ids
    mask += [int(target)] * len(ids)
  if len(tokens) > max_len:
    if not truncate:
      raise ValueError(f"{where}: {len(tokens)} tokens do not fit the context of {max_len} "
                       f"(train.seq_len); shorten it, or set data.truncate to cut it")
    tokens, mask = tokens[:max_len], mask[:max_len]
  # The first token is never a target (nothing precedes it in its row).
  if not any(mask[1:]):
    raise ValueError(f"{where}: no assistant token to train on"
                     + (" within the context (cut by data.truncate)" if truncate else ""))
  return Example(np.asarray(tokens, np.int32), np.asarray(mask, np.int32))


def prompt_ids(messages: Sequence[Message], template: ChatTemplate,
               tokenizer: Tokenizer) -> List[int]:
  """Token ids of `messages` and the generation prompt, encoded piece by piece as in training:
  what a model continues to answer as the assistant."""
  ids = [i for text, _ in template.spans(messages) for i in tokenizer.encode(text)]
  rendered, prompt = template.render(messages), template.prompt(messages)
  if not prompt.startswith(rendered):
    raise ValueError(f"{template.name} is not incremental: the generation prompt does not "
                     f"extend the conversation's text")
  return ids + tokenizer.encode(prompt[len(rendered):])


def load_examples(paths: Sequence[str], template: ChatTemplate, tokenizer: Tokenizer, *,
                  max_len: int, truncate: bool = False) -> List[Example]:
  """Every conversation of the files, encoded."""
  examples = []
  for path in paths:
    for where, messages in read_conversations(path):
      examples.append(encode(messages, template, tokenizer, max_len=max_len, truncate=truncate,
                             where=where))
  return examples
