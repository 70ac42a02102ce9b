"""forward()/__call__ of the proxy: logits like transformers', checked against
a numpy implementation of the tiny llama that shares no code with the agent."""
import numpy as np
import pytest

import rm_abstract
from rm_abstract import logits as rm_logits
from rm_abstract.client import AgentError

from conftest import numpy_llama_logits

IDS = [1, 17, 42, 99, 3, 250, 7]


@pytest.fixture(scope="module")
def model(agent, tiny_model):
    rm_abstract.init(device="cpu", agent_socket=str(agent.socket), verbose=False)
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(tiny_model))


def test_logits_equal_an_independent_numpy_llama(model, tiny_model, agent):
    want = numpy_llama_logits(tiny_model, IDS)
    out = model(np.array([IDS]))
    assert isinstance(out.logits, np.ndarray) and out.logits.dtype == np.float32
    assert out.logits.shape == (1, len(IDS), 256)
    np.testing.assert_allclose(out.logits[0], want, atol=1e-4)
    # out[0] is the logits (no loss), like transformers' ModelOutput
    assert out[0] is out.logits and out["logits"] is out.logits
    # and exactly what the agent answers directly
    np.testing.assert_array_equal(out.logits[0], agent.direct_forward(tiny_model, [IDS])[0])
    # lists in, lists out
    as_list = model.forward(input_ids=[IDS[:3]]).logits
    assert isinstance(as_list, list) and len(as_list[0]) == 3 and len(as_list[0][0]) == 256
    np.testing.assert_allclose(np.array(as_list[0]), want[:3], atol=1e-4)


def test_logits_to_keep_and_tokenizer_output(model, tok):
    last = model(np.array([IDS]), logits_to_keep=1).logits
    assert last.shape == (1, 1, 256)
    np.testing.assert_allclose(last[0, 0], model(np.array([IDS])).logits[0, -1], atol=1e-5)
    # model(**tok(...)) passes input_ids and attention_mask
    enc = tok("Hello world", return_tensors="np")
    out = model(**enc)
    assert out.logits.shape == (1, enc["input_ids"].shape[1], 256)


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_left_padding_gives_each_row_its_own_logits_and_zeros_for_pads(model, tiny_model):
    a, b = [5, 6, 7, 8], [9, 10]
    out = model(np.array([a, [0, 0] + b]), attention_mask=np.array([[1, 1, 1, 1], [0, 0, 1, 1]])).logits
    np.testing.assert_allclose(out[0], numpy_llama_logits(tiny_model, a), atol=1e-4)
    np.testing.assert_allclose(out[1, 2:], numpy_llama_logits(tiny_model, b), atol=1e-4)
    assert not out[1, :2].any()


def test_hand_written_greedy_loop_with_past_key_values_equals_generate(model):
    ids = np.array([[5, 6, 7]])
    out = model(input_ids=ids, use_cache=True)
    got = []
    for _ in range(6):
        nxt = int(out.logits[0, -1].argmax())
        got.append(nxt)
        seen = out.past_key_values.get_seq_length() + 1
        # transformers' loops pass a mask over past + new tokens
        out = model(input_ids=np.array([[nxt]]), attention_mask=np.ones((1, seen), dtype=np.int64),
                    past_key_values=out.past_key_values, use_cache=True)
        assert out.logits.shape == (1, 1, 256)  # only the new position, like a real KV cache
    assert got == model.generate(ids, max_new_tokens=6, eos_token_id=[]).tolist()[0][3:]
    assert out.past_key_values.get_seq_length() == 3 + 6


def test_labels_give_transformers_causal_lm_loss(model, tiny_model):
    want = numpy_llama_logits(tiny_model, IDS)
    lse = np.log(np.exp(want - want.max(-1, keepdims=True)).sum(-1)) + want.max(-1)
    nll = [lse[t] - want[t, IDS[t + 1]] for t in range(len(IDS) - 1)]
    out = model(np.array([IDS]), labels=np.array([IDS]))
    assert out.loss == pytest.approx(np.mean(nll), abs=1e-4)
    assert out[0] is out.loss  # loss first, like transformers
    labels = list(IDS)
    labels[3] = -100  # ignored position
    masked = model(np.array([IDS]), labels=np.array([labels])).loss
    assert masked == pytest.approx(np.mean(nll[:2] + nll[3:]), abs=1e-4)
    loss, logits, _past = model(np.array([IDS]), labels=np.array([IDS]), return_dict=False)
    assert logits.shape == (1, len(IDS), 256) and loss == pytest.approx(out.loss)


def test_long_inputs_are_split_over_requests(model, tiny_model, monkeypatch):
    full = model(np.array([IDS])).logits
    monkeypatch.setattr(rm_logits, "MAX_ROWS", 3)
    # rows 0-2 from ids[:3], rows 3-5 from ids[:6], row 6 from ids[:7]
    plan = rm_logits.plan([IDS], [len(IDS)])
    assert [(keep, [len(ids) for _, ids in p]) for keep, p in plan] == [(3, [3]), (3, [6]), (1, [7])]
    # two short rows share a request when they fit
    assert [len(p) for _, p in rm_logits.plan([[1], [2]], [1, 1])] == [2]
    split = model(np.array([IDS])).logits
    np.testing.assert_allclose(split, full, atol=1e-5)


def test_what_cannot_work_says_so(model):
    with pytest.raises(NotImplementedError, match="inputs_embeds"):
        model(inputs_embeds=np.zeros((1, 2, 64)))
    with pytest.raises(NotImplementedError, match="past_key_values"):
        model(np.array([[1]]), past_key_values=((np.zeros(1), np.zeros(1)),))
    with pytest.raises(ValueError, match="attention_mask is shorter"):
        model(np.array([[1, 2, 3]]), attention_mask=np.array([[1, 1]]))
    with pytest.raises(AgentError, match="outside the vocabulary"):
        model(np.array([[300]]))


def test_torch_in_torch_out(model, tiny_model):
    """With torch installed (the torch pass of run-tests.sh), tensors come
    back as torch tensors and the output is transformers' own class."""
    torch = pytest.importorskip("torch")
    from transformers.modeling_outputs import CausalLMOutputWithPast
    ids = torch.tensor([IDS])
    out = model(ids, labels=ids)
    assert isinstance(out, CausalLMOutputWithPast)
    assert out.logits.dtype == torch.float32 and tuple(out.logits.shape) == (1, len(IDS), 256)
    np.testing.assert_allclose(out.logits[0].numpy(), numpy_llama_logits(tiny_model, IDS), atol=1e-4)
    assert isinstance(out.loss, torch.Tensor) and out.loss.dim() == 0
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, eos_token_id=[])
    assert gen.dtype == torch.long and gen[0, :len(IDS)].tolist() == IDS
    assert gen[0, len(IDS)].item() == int(out.logits[0, -1].argmax())
