"""Greedy agreement: teacher-forced 16-bit answers through each method's cache."""

import torch

from kvquant_vllm.eval.agreement import ChatAnswer, evaluate_agreement, read_prompts, teacher_forced
from kvquant_vllm.quant.registry import get_codec
from kvquant_vllm.quant.geometry import attention_geometry


def _answers(model, n: int = 6, prompt_len: int = 12, answer_len: int = 10) -> list[ChatAnswer]:
    """Prompts of random tokens answered greedily by the model itself."""
    rng = torch.Generator().manual_seed(0)
    answers = []
    for _ in range(n):
        prompt = torch.randint(0, 256, (1, prompt_len), generator=rng)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=answer_len,
                             do_sample=False, pad_token_id=0)
        answers.append(ChatAnswer(prompt[0].tolist(), out[0, prompt_len:].tolist()))
    return answers


def test_unquantized_agrees_with_itself_and_coarse_codes_do_not(tiny_model):
    answers = _answers(tiny_model)
    results = evaluate_agreement(tiny_model, answers, ["int8-token", "int2-token"])
    assert [r.method for r in results] == ["fp16", "int8-token", "int2-token"]
    fp16, int8, int2 = results
    assert fp16.agreement == 1.0 and fp16.ppl_delta == 0.0 and fp16.answer_tokens == 60
    assert int8.agreement >= int2.agreement and int2.agreement < 1.0
    assert abs(int8.ppl_delta) < abs(int2.ppl_delta)


def test_teacher_forcing_scores_exactly_the_answer_tokens(tiny_model):
    answers = _answers(tiny_model, n=2)
    codec = get_codec("int2-token", [], attention_geometry(tiny_model.config))
    agree, nll, count = teacher_forced(tiny_model, answers, codec)
    expected_agree, expected_nll = 0, 0.0
    from kvquant_vllm.eval.fakequant import fake_quantized

    with torch.inference_mode(), fake_quantized(tiny_model, codec):
        for a in answers:  # token by token: the argmax and log-probability of each answer token given the rest
            for i, token in enumerate(a.answer):
                logits = tiny_model(torch.tensor([a.prompt + a.answer[:i]])).logits[0, -1].float()
                expected_agree += int(logits.argmax()) == token
                expected_nll -= float(logits.log_softmax(-1)[token])
    assert count == 20 and agree == expected_agree
    assert abs(nll - expected_nll) < 1e-3 * abs(expected_nll)


def test_prompts_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first question\n\n  second one  \n")
    assert read_prompts(path) == ["first question", "second one"]
    path.write_text("\n\n")
    import pytest

    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")
