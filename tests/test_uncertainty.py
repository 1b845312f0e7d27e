import math

import pytest
from litellm.types.utils import ModelResponse

from litellm_routenlp.uncertainty import classifier_uncertainty, response_uncertainty, token_uncertainty


def test_mean_of_one_minus_token_probability():
    # p = 0.9, 0.5, 0.2 -> 1-p = 0.1, 0.5, 0.8 -> mean 0.4666...
    logprobs = [math.log(0.9), math.log(0.5), math.log(0.2)]
    assert token_uncertainty(logprobs) == pytest.approx((0.1 + 0.5 + 0.8) / 3)


def test_certain_tokens_give_zero_and_no_tokens_give_none():
    assert token_uncertainty([0.0, 0.0]) == 0.0
    assert token_uncertainty([]) is None


def test_rounding_above_zero_is_capped():
    assert token_uncertainty([1e-9]) == 0.0


def test_nan_is_rejected():
    with pytest.raises(ValueError):
        token_uncertainty([float("nan")])


def test_classifier_uncertainty_is_one_minus_top_probability():
    assert classifier_uncertainty(0.75) == pytest.approx(0.25)
    assert classifier_uncertainty(0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        classifier_uncertainty(1.5)


def test_response_uncertainty_reads_openai_logprobs():
    response = ModelResponse(choices=[{"index": 0, "message": {"role": "assistant", "content": "ab"},
                                       "finish_reason": "stop"}])
    response.choices[0].logprobs = {"content": [{"token": "a", "logprob": math.log(0.5), "bytes": None,
                                                 "top_logprobs": []},
                                                {"token": "b", "logprob": 0.0, "bytes": None,
                                                 "top_logprobs": []}]}
    assert response_uncertainty(response) == pytest.approx(0.25)
    response.choices[0].logprobs = None
    assert response_uncertainty(response) is None
