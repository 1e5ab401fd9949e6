"""Data pipelines: sources, packing, SFT and preference rows, per-host slices, exact resume."""

import json
import math

import numpy as np
import pytest

from llada_jax.training import data

EOS, EOT, BOS, SH, EH = 2, 6, 1, 4, 5


class ByteTokenizer:
  """A complete (if simple) tokenizer with the contract's interface: bytes + 10."""
  eos_id, eot_id, bos_id, start_header_id, end_header_id = EOS, EOT, BOS, SH, EH

  def encode(self, text):
    return [b + 10 for b in text.encode()]

  def decode(self, ids):
    return bytes(i - 10 for i in ids if i >= 10).decode()

  def apply_chat_template(self, messages, add_generation_prompt=True):
    out = [BOS]
    for m in messages:
      out += [SH] + self.encode(m["role"]) + [EH] + self.encode("\n\n" + m["content"].strip()) + [EOT]
    return out + ([SH] + self.encode("assistant") + [EH] + self.encode("\n\n")
                  if add_generation_prompt else [])


TOK = ByteTokenizer()
DOCS = [{"text": f"document number {i} " + "x" * (i % 7)} for i in range(40)]


def _pretrain(docs=DOCS, **kw):
  args = dict(kind="pretrain", seq_len=16, batch_size=4, seed=0, eos_id=EOS)
  args.update(kw)
  import grain
  return data.train_dataset(grain.MapDataset.source(docs), TOK, **args)


def test_packing_keeps_every_document_whole():
  it = iter(_pretrain())
  rows = np.concatenate([next(it)["input_ids"] for _ in range(20)])
  assert rows.shape == (80, 16) and rows.dtype == np.int32
  stream = rows.reshape(-1).tolist()
  pieces = []
  while EOS in stream:
    i = stream.index(EOS)
    pieces.append(stream[:i])
    stream = stream[i + 1:]
  texts = {d["text"] for d in DOCS}
  assert len(pieces) > 40 and all(TOK.decode(p) in texts for p in pieces)
  assert {TOK.decode(p) for p in pieces[:40]} == texts  # one epoch = every document once


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_from_iterator_state_is_exact(prefetch):
  """Also with a prefetch thread running ahead: the state counts batches taken."""
  it = iter(_pretrain(prefetch=prefetch))
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it)["input_ids"] for _ in range(4)]
  json.dumps(state)  # saved with the checkpoint as JSON
  it2 = iter(_pretrain(prefetch=prefetch))
  next(it2)  # set_state must also discard what the thread had prefetched
  it2.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(it2)["input_ids"], w)
  plain = iter(_pretrain())
  plain.set_state(state)  # the same state as without prefetching
  np.testing.assert_array_equal(next(plain)["input_ids"], want[0])


def test_hosts_read_disjoint_slices():
  seen = []
  for host in range(2):
    it = iter(_pretrain(process_index=host, process_count=2, seq_len=800, batch_size=1))
    ids = next(it)["input_ids"][0].tolist()  # 800 tokens > one epoch of 20 documents
    seen.append({TOK.decode(p) for p in _split_eos(ids)})
  assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]


def _split_eos(ids):
  """Documents ended by EOS in a packed stream (the last, unended, is dropped)."""
  out, cur = [], []
  for i in ids:
    if i == EOS:
      out.append(cur)
      cur = []
    else:
      cur.append(i)
  return out


def test_sft_rows_are_right_padded_with_eos():
  row = data.sft_example({"prompt": " hi ", "response": "ok"}, TOK, 40)
  prompt = TOK.apply_chat_template([{"role": "user", "content": "hi"}])
  n = int(row["prompt_len"])
  assert n == len(prompt) and row["input_ids"].tolist()[:n] == prompt
  assert row["input_ids"].tolist()[n:n + 3] == TOK.encode("ok") + [EOT]
  assert set(row["input_ids"].tolist()[n + 3:]) == {EOS} and len(row["input_ids"]) == 40
  chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
  np.testing.assert_array_equal(data.sft_example(chat, TOK, 40)["input_ids"], row["input_ids"])
  with pytest.raises(ValueError, match="messages` must end with an assistant"):
    data.sft_example({"messages": [{"role": "user", "content": "hi"}]}, TOK, 40)
  with pytest.raises(ValueError, match="prompt`/`response"):
    data.sft_example({"text": "x"}, TOK, 40)


def test_sft_pipeline_batches():
  import grain
  rows = [{"prompt": f"q{i}", "response": "a" * i} for i in range(10)]
  ds = data.train_dataset(grain.MapDataset.source(rows), TOK, kind="sft", seq_len=32,
                          batch_size=4, seed=1, eos_id=EOS)
  batch = next(iter(ds))
  assert batch["input_ids"].shape == (4, 32) and batch["prompt_len"].shape == (4,)


def test_preference_rows_in_every_format_share_the_prompt():
  want = data.preference_example({"prompt": "hi", "chosen": "yes", "rejected": "no!"}, TOK, 40)
  n = int(want["prompt_len"])
  np.testing.assert_array_equal(want["input_ids"],
                                data.sft_example({"prompt": "hi", "response": "yes"}, TOK, 40)
                                ["input_ids"])
  assert want["rejected_ids"].tolist()[:n] == want["input_ids"].tolist()[:n]
  assert want["rejected_ids"].tolist()[n:n + 4] == TOK.encode("no!") + [EOT]
  user = [{"role": "user", "content": "hi"}]
  answer = lambda text: [{"role": "assistant", "content": text}]
  for doc in ({"messages": user, "chosen": "yes", "rejected": "no!"},  # chat messages
              {"prompt": user, "chosen": answer("yes"), "rejected": answer("no!")},  # TRL
              {"chosen": user + answer("yes"), "rejected": user + answer("no!")}):  # implicit
    got = data.preference_example(doc, TOK, 40)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("doc, why", [
    ({"prompt": "q", "chosen": "a"}, "no 'rejected'"),
    ({"prompt": "q", "chosen": " a ", "rejected": "a"}, "the same answer"),
    ({"chosen": "a", "rejected": "b"}, "needs `prompt` or `messages`"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
     "`rejected` must be a string or a list of messages"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "`chosen` is an empty answer"),
])
def test_bad_preference_examples_are_named(doc, why):
  with pytest.raises(ValueError, match=why):
    data.preference_fields(doc)


def test_bad_preference_lines_are_reported_by_number_and_skipped(tmp_path, capsys):
  lines = [{"prompt": "q1", "chosen": "a", "rejected": "b"},
           {"prompt": "q2", "chosen": "a"},
           {"prompt": "q3", "chosen": "same", "rejected": "same"},
           {"prompt": "q4", "chosen": "c", "rejected": "d"}]
  path = tmp_path / "prefs.jsonl"
  path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  docs = data.documents(str(path), check=data.preference_fields)
  assert [d["prompt"] for d in docs] == ["q1", "q4"]
  err = capsys.readouterr().err
  assert f"{path}:2: skipped: preference example has no 'rejected'" in err, err
  assert f"{path}:3: skipped: `chosen` and `rejected` are the same answer" in err, err
  path.write_text(json.dumps(lines[1]) + "\n")
  with pytest.raises(ValueError, match="no usable line"):
    data.documents(str(path), check=data.preference_fields)
  with pytest.raises(ValueError, match="must be JSONL"):
    data.documents(data.PYDOC, check=data.preference_fields)


def test_preference_pipeline_batches():
  import grain
  rows = [{"prompt": f"q{i}", "chosen": "a" * i, "rejected": "b"} for i in range(1, 10)]
  batch = next(iter(data.train_dataset(grain.MapDataset.source(rows), TOK, kind="vrpo",
                                       seq_len=32, batch_size=4, seed=1, eos_id=EOS)))
  assert batch["input_ids"].shape == batch["rejected_ids"].shape == (4, 32)
  assert batch["prompt_len"].shape == (4,)


def test_sources(tmp_path):
  (tmp_path / "a.txt").write_text("first block\n\nsecond block\n")
  assert data.documents(str(tmp_path / "*.txt")) == [{"text": "first block"},
                                                     {"text": "second block"}]
  (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"prompt": "p", "response": "r"}\n')
  assert data.documents(str(tmp_path / "b.jsonl"))[1]["response"] == "r"
  (tmp_path / "bad.jsonl").write_text("{nope\n")
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    data.documents(str(tmp_path / "bad.jsonl"))
  path = str(tmp_path / "ids.array_record")
  data.write_token_records(path, [[5, 6, 7], [8]])
  docs = data.documents(path)
  assert len(docs) == 2 and docs[0]["ids"].tolist() == [5, 6, 7]
  assert data.pretrain_ids(docs[1], None, EOS).tolist() == [8, EOS]
  assert len(data.documents(data.PYDOC)) > 1000
  with pytest.raises(FileNotFoundError, match="no file matches"):
    data.documents(str(tmp_path / "missing*.txt"))
  (tmp_path / "c.csv").write_text("x")
  with pytest.raises(ValueError, match="unknown file type"):
    data.documents(str(tmp_path / "c.csv"))


def test_tfds_needs_extra():
  try:
    import tensorflow_datasets  # noqa: F401  pylint: disable=unused-import
    pytest.skip("tensorflow-datasets is installed")
  except ImportError:
    with pytest.raises(ImportError, match="llada_jax\\[tfds\\]"):
      data.documents("tfds:c4/en")


def test_heldout_split_and_unigram_entropy():
  train, heldout = data.split_heldout(DOCS, 0.1)
  assert len(heldout) == 4 and len(train) == 36
  assert not {d["text"] for d in train} & {d["text"] for d in heldout}
  batches = [{"input_ids": np.array([[10, 11, 12, 13], [10, 11, 12, 13]])}]
  assert math.isclose(data.unigram_entropy_bits(batches), 2.0)
  sft = [{"input_ids": np.array([[1, 1, 10, 11]]), "prompt_len": np.array([2])}]
  assert math.isclose(data.unigram_entropy_bits(sft), 1.0)
  evals = data.eval_batches(heldout, TOK, kind="pretrain", seq_len=8, batch_size=2,
                            num_batches=3, eos_id=EOS)
  assert len(evals) == 3 and evals[0]["input_ids"].shape == (2, 8)
