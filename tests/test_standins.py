"""The offline stand-in tiers (routenlp_standins): real data, real SmolLM2, a real litellm.Router.

Artifacts come from the repository's artifacts root; a session fixture builds only what is missing,
with subset sizes so a fresh checkout pays ~20 s once (the serving build uses larger ones).
"""

from __future__ import annotations

import asyncio
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from litellm_routenlp.uncertainty import token_uncertainty  # noqa: E402
from routenlp_standins.artifacts import (MissingArtifactError, default_artifacts_root,  # noqa: E402
                                         write_tensors_and_meta)
from routenlp_standins.build import BuildSettings, build_all  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("banking77", "clinc150", "bitext")
# Only used when an artifact is missing; a serving build (`python -m routenlp_standins build`) is larger.
TEST_BUILD = BuildSettings(classifier_train_limit=1500, index_train_limit=3000, eval_limit=200)
PRICES = {"classifier": 0.00001, "smollm2": 0.0001, "retrieval": 0.0008, "replay": 0.008}


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """The artifacts root with every stand-in artifact present (missing ones built with TEST_BUILD)."""
    root = default_artifacts_root().resolve()
    if not (root / "encoder" / "model.onnx").is_file():
        pytest.fail(f"MiniLM encoder not exported to {root / 'encoder'}: run `routenlp export-encoder` first")
    build_all(root, tasks=TASKS, settings=TEST_BUILD, progress=False, log=lambda line: None)
    return root


@pytest.fixture(scope="module")
def minilm(artifacts: Path):
    from routenlp_standins.minilm import shared_minilm

    return shared_minilm(artifacts)


def _test_rows(task: str, n: int):
    from routenlp_core.tasks import get_task

    return get_task(task).load("test", limit=n, seed=7)


# -- T1 classifier ---------------------------------------------------------------------------------

@pytest.mark.parametrize("task,floor", [("banking77", 0.75), ("clinc150", 0.6)])
def test_classifier_accuracy_is_far_above_chance_on_real_test_queries(artifacts, minilm, task, floor):
    from routenlp_standins.classifier import ClassifierTier

    tier = ClassifierTier(artifacts, task)
    rows = _test_rows(task, 150)
    predictions = tier.classify(minilm.encode([row.text for row in rows]))
    accuracy = np.mean([label == row.reference for (label, _), row in zip(predictions, rows)])
    chance = 1 / len(tier.labels)
    assert accuracy >= floor, f"{task}: accuracy {accuracy:.3f} (chance {chance:.3f})"
    assert tier.meta["test_accuracy"] > 10 * chance


def test_classifier_answer_is_one_token_whose_probability_is_the_top_class(artifacts, minilm):
    from routenlp_standins.classifier import ClassifierTier

    tier = ClassifierTier(artifacts, "banking77")
    answer = tier.answer("I am still waiting on my card?", minilm)
    assert answer.text in tier.labels and len(answer.tokens) == 1 and answer.tokens[0].token == answer.text
    p_top = answer.details["p_top"]
    assert 1 / len(tier.labels) < p_top <= 1.0
    assert token_uncertainty([t.logprob for t in answer.tokens]) == pytest.approx(1 - p_top, abs=1e-6)
    assert answer.prompt_tokens == minilm.count_tokens("I am still waiting on my card?") > 0


def test_classifier_refuses_a_generation_task_and_names_the_build_command_when_missing(artifacts, tmp_path):
    from routenlp_standins.classifier import ClassifierTier, UnsupportedTaskError, check_classifiable

    with pytest.raises(UnsupportedTaskError, match="bitext"):
        check_classifiable("bitext")
    with pytest.raises(MissingArtifactError, match=r"banking77\.json.*python -m routenlp_standins build"):
        ClassifierTier(tmp_path, "banking77")


# -- T3 retrieval ----------------------------------------------------------------------------------

def test_knn_vote_takes_the_majority_and_breaks_ties_by_similarity():
    from routenlp_standins.retrieval import knn_vote

    index = np.eye(4, dtype=np.float32)
    groups = ["a", "a", "b", "b"]
    query = np.array([[0.1, 0.2, 0.9, 0.3]], dtype=np.float32)  # b-rows are closer in total
    group, share, nearest = knn_vote(index, groups, query, k=4)[0]
    assert (group, share, nearest) == ("b", 0.5, 2)
    group, share, nearest = knn_vote(index, groups, query, k=3)[0]  # neighbours 2, 3, 1
    assert (group, share, nearest) == ("b", pytest.approx(2 / 3), 2)


def test_retrieval_answers_intents_accurately_and_reports_the_vote_share(artifacts, minilm):
    from routenlp_standins.retrieval import RetrievalTier

    tier = RetrievalTier(artifacts, "banking77")
    rows = _test_rows("banking77", 60)
    answers = [tier.answer(row.text, minilm) for row in rows]
    accuracy = np.mean([answer.text == row.reference for answer, row in zip(answers, rows)])
    assert accuracy >= 0.7
    for answer in answers:
        assert len(answer.tokens) == 1
        assert math.exp(answer.tokens[0].logprob) == pytest.approx(answer.details["vote_share"])
        assert answer.details["vote_share"] in {i / tier.k for i in range(1, tier.k + 1)}


def test_retrieval_on_bitext_returns_a_train_response_of_the_majority_intent(artifacts, minilm):
    from routenlp_standins.retrieval import RetrievalTier

    tier = RetrievalTier(artifacts, "bitext")
    answer = tier.answer("I want to cancel the order I placed yesterday, how do I do that?", minilm)
    assert answer.details["group"] == "cancel_order"
    neighbour = tier.ids.index(answer.details["neighbour_id"])
    assert answer.text == tier.answers[neighbour] and tier.groups[neighbour] == "cancel_order"
    assert "".join(token.token for token in answer.tokens) == answer.text
    assert len(answer.tokens) == minilm.count_tokens(answer.text)  # usage counts the reported tokens
    share = answer.details["vote_share"]
    assert token_uncertainty([t.logprob for t in answer.tokens]) == pytest.approx(1 - share, abs=1e-6)


# -- T4 replay -------------------------------------------------------------------------------------

def test_replay_returns_the_recorded_answer_with_zero_uncertainty_for_known_queries(artifacts, minilm):
    from routenlp_standins.replay import HIT, ReplayTier
    from routenlp_standins.retrieval import RetrievalTier

    from routenlp_core.tasks import get_task

    for task in ("clinc150", "bitext"):
        replay = ReplayTier(task, retrieval=lambda: RetrievalTier(artifacts, task))
        spec = get_task(task)
        example = spec.load("test", limit=1, seed=3)[0]
        mangled = "  " + example.text.replace(" ", " \n ", 1) + "\t"
        answer = replay.answer(mangled, minilm)
        assert answer.text == spec.gold_answer(example.reference)
        assert answer.system_fingerprint == HIT and answer.details["example_id"] == example.id
        assert token_uncertainty([t.logprob for t in answer.tokens]) == 0.0
        assert "".join(token.token for token in answer.tokens) == answer.text


def test_replay_falls_back_to_retrieval_and_marks_the_miss(artifacts, minilm):
    from routenlp_standins.replay import MISS, ReplayTier
    from routenlp_standins.retrieval import RetrievalTier

    retrieval = RetrievalTier(artifacts, "banking77")
    replay = ReplayTier("banking77", retrieval=lambda: retrieval)
    query = "my brand new debit card still has not shown up in the post, where is it"
    assert replay.lookup(query) is None
    answer = replay.answer(query, minilm)
    assert answer.system_fingerprint == MISS and answer.details["replay"] == "miss"
    assert answer.text == retrieval.answer(query, minilm).text
    share = answer.details["vote_share"]
    assert token_uncertainty([t.logprob for t in answer.tokens]) == pytest.approx(1 - share, abs=1e-6)


# -- T2 SmolLM2 ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm(artifacts):
    from routenlp_standins.smollm import SmolLM2Tier

    tier = SmolLM2Tier(artifacts)
    tier.load()
    return tier


BITEXT_MESSAGES = [{"role": "user", "content": "How do I cancel my order?"}]


def test_smollm2_returns_text_and_one_real_logprob_per_completion_token(smollm):
    answer = smollm.answer(BITEXT_MESSAGES, "bitext", max_tokens=12)
    assert answer.text.strip()
    assert answer.completion_tokens == len(answer.tokens) <= 12
    assert all(token.logprob <= 0.0 for token in answer.tokens)
    assert "".join(token.token for token in answer.tokens) == answer.text
    u = token_uncertainty([t.logprob for t in answer.tokens])
    assert 0.0 <= u <= 1.0
    assert answer.prompt_tokens == len(smollm.prompt_ids(BITEXT_MESSAGES, "bitext"))
    # The task's system prompt reaches the model.
    assert smollm.prompt_ids(BITEXT_MESSAGES, "banking77") != smollm.prompt_ids(BITEXT_MESSAGES, "bitext")


def test_smollm2_refuses_prompts_beyond_its_context_window(smollm):
    from routenlp_standins.smollm import PromptTooLongError

    smollm.check_fits(8000, 64)
    with pytest.raises(PromptTooLongError, match="8192-token context window"):
        smollm.check_fits(8190, 64)


def test_smollm2_tokens_and_logprobs_match_transformers_generate(smollm):
    """The manual KV-cache loop (starting from the cached system-prompt prefix) is greedy decoding,
    and its logprobs are log_softmax of the raw logits."""
    import torch

    prompt, prefix_len = smollm.encode_prompt(BITEXT_MESSAGES, "bitext")
    assert 0 < prefix_len < len(prompt)
    steps = [step for step in smollm.stream_tokens(prompt, 6, prefix_len=prefix_len) if step.logprob is not None]
    ids = torch.tensor([prompt])
    out = smollm._model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
    reference = smollm._model.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)[0]
    generated = out.sequences[0, len(prompt):].tolist()
    assert [step.token_id for step in steps] == generated[:len(steps)]
    assert [step.logprob.logprob for step in steps] == pytest.approx(reference[:len(steps)].tolist(), abs=1e-3)


def test_smollm2_stream_yields_the_same_tokens_as_the_full_answer(smollm):
    full = smollm.answer(BITEXT_MESSAGES, "bitext", max_tokens=10)
    from routenlp_standins.smollm import clamp_max_tokens

    prompt, prefix_len = smollm.encode_prompt(BITEXT_MESSAGES, "bitext")  # what the handler streams
    streamed = list(smollm.stream_tokens(prompt, clamp_max_tokens(10), prefix_len=prefix_len))
    assert streamed[-1].token_id == -1 and streamed[-1].finish_reason == full.finish_reason
    assert [s.logprob for s in streamed if s.logprob is not None] == full.tokens
    assert "".join(s.text_delta for s in streamed) == full.text


# -- LiteLLM round trip ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def router(artifacts):
    import litellm

    from routenlp_standins.handler import LocalTiers

    handler = LocalTiers(artifacts)
    patch = pytest.MonkeyPatch()
    patch.setattr(litellm, "custom_provider_map",
                  [{"provider": "routenlp-local", "custom_handler": handler}])
    model_list = [{"model_name": f"t{tier}", "litellm_params": {"model": f"routenlp-local/{name}",
                                                                 "input_cost_per_token": price,
                                                                 "output_cost_per_token": price},
                   "model_info": {"id": f"routenlp-t{tier}", "routenlp_tier": tier}}
                  for tier, (name, price) in enumerate(PRICES.items(), start=1)]
    yield litellm.Router(model_list=model_list)
    patch.undo()


def test_router_round_trip_prices_the_call_and_carries_logprobs(router):
    from litellm_routenlp.uncertainty import response_uncertainty

    async def call(model: str, task: str, text: str):
        return await router.acompletion(model=model, messages=[{"role": "user", "content": text}],
                                        metadata={"task": task})

    response = asyncio.run(call("t1", "banking77", "I am still waiting on my card?"))
    assert response.choices[0].message.content == "card_arrival"
    assert response.model == "routenlp-local/classifier"
    assert len(response.choices[0].logprobs["content"]) == 1 == response.usage.completion_tokens
    assert 0.0 <= response_uncertainty(response) < 1.0
    expected = (response.usage.prompt_tokens + response.usage.completion_tokens) * PRICES["classifier"]
    assert response._hidden_params["response_cost"] == pytest.approx(expected) and expected > 0

    replay = asyncio.run(call("t4", "banking77", "I am still waiting on my card?"))
    assert replay.system_fingerprint == "replay-hit" and response_uncertainty(replay) == 0.0
    assert replay._hidden_params["response_cost"] > response._hidden_params["response_cost"]


def test_router_streams_smollm2_with_logprobs_usage_and_cost(router):
    import litellm
    from litellm.integrations.custom_logger import CustomLogger

    class CostProbe(CustomLogger):
        costs: list[float] = []

        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
            # Earlier tests' calls may still be logging: count only this test's deployment.
            if (kwargs.get("standard_logging_object") or {}).get("model_id") == "routenlp-t2":
                self.costs.append(kwargs.get("response_cost") or 0.0)

    probe = CostProbe()
    messages = [{"role": "user", "content": "Where is my refund?"}]

    async def run():
        litellm.callbacks.append(probe)
        try:
            full = await router.acompletion(model="t2", messages=messages, metadata={"task": "bitext"}, max_tokens=8)
            stream = await router.acompletion(model="t2", messages=messages, metadata={"task": "bitext"},
                                              max_tokens=8, stream=True)
            chunks = [chunk async for chunk in stream]
            for _ in range(50):  # success logging of a stream runs after the last chunk
                if len(probe.costs) >= 2:
                    break
                await asyncio.sleep(0.1)
            return full, chunks
        finally:
            litellm.callbacks.remove(probe)

    full, chunks = asyncio.run(run())
    streamed_tokens = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                       for entry in chunk.choices[0].logprobs["content"]]
    assert [t["token"] for t in streamed_tokens] == [t["token"] for t in full.choices[0].logprobs["content"]]
    assert [t["logprob"] for t in streamed_tokens] == pytest.approx(
        [t["logprob"] for t in full.choices[0].logprobs["content"]])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len(probe.costs) == 2 and all(cost > 0 for cost in probe.costs)
    assert probe.costs[1] == pytest.approx(probe.costs[0])  # same tokens, same price


def test_the_deployments_model_info_names_what_it_serves_and_a_client_cannot_redirect_it(artifacts, tmp_path):
    """A co-opt iteration holding a banking77 head that always answers `card_linking`: the deployment whose
    model_info names it serves that head; the request body cannot point it elsewhere (LiteLLM's router
    sets model_info from the deployment), and a relative directory is a 500 naming the field."""
    import litellm

    from routenlp_standins.handler import LocalTiers

    labels = ["card_arrival", "card_linking"]
    write_tensors_and_meta(tmp_path / "iter-1" / "tiers" / "classifier" / "banking77.safetensors",
                           {"coef": np.zeros((2, 384), np.float32), "intercept": np.array([0.0, 9.0], np.float32)},
                           {"tier": "classifier", "task": "banking77", "labels": labels})
    patch = pytest.MonkeyPatch()
    patch.setattr(litellm, "custom_provider_map", [{"provider": "routenlp-local", "custom_handler": LocalTiers()}])

    def deployment(name: str, **info) -> dict:
        return {"model_name": name, "litellm_params": {"model": "routenlp-local/classifier"},
                "model_info": {"id": f"test-{name}", **info}}

    router = litellm.Router(model_list=[
        deployment("distilled", routenlp_artifacts_dir=str(artifacts), routenlp_coopt_dir=str(tmp_path / "iter-1")),
        deployment("base"), deployment("bad", routenlp_coopt_dir="iter-1")])

    async def ask(model: str, **extra) -> str:
        response = await router.acompletion(model=model, messages=[{"role": "user", "content": "card still not here"}],
                                            metadata={"task": "banking77"}, **extra)
        return response.choices[0].message.content

    try:
        assert asyncio.run(ask("distilled")) == "card_linking"
        assert asyncio.run(ask("base")) == "card_arrival"
        elsewhere = {"routenlp_coopt_dir": str(tmp_path / "nowhere"), "routenlp_artifacts_dir": "/nowhere"}
        assert asyncio.run(ask("distilled", model_info=elsewhere, **elsewhere)) == "card_linking"
        assert asyncio.run(ask("base", model_info=elsewhere)) == "card_arrival"
        with pytest.raises(litellm.InternalServerError, match="model_info.routenlp_coopt_dir must be an absolute"):
            asyncio.run(ask("bad"))
    finally:
        patch.undo()


def test_missing_or_unsupported_task_is_a_400_that_says_what_to_send(router):
    import litellm

    async def call(**metadata):
        return await router.acompletion(model="t1", messages=[{"role": "user", "content": "hi"}],
                                        metadata=metadata)

    with pytest.raises(litellm.BadRequestError, match="needs the task"):
        asyncio.run(call())
    with pytest.raises(litellm.BadRequestError, match="not a single-label classification"):
        asyncio.run(call(task="bitext"))
    with pytest.raises(litellm.BadRequestError, match="unknown task"):
        asyncio.run(call(task="no_such_task"))


def test_task_is_found_in_the_proxys_requester_metadata_copy():
    from routenlp_standins.handler import request_task

    assert request_task({"metadata": {"task": "bitext"}}) == "bitext"
    assert request_task({"metadata": {"requester_metadata": {"task": "clinc150"}}}) == "clinc150"
    assert request_task({"litellm_metadata": {"requester_metadata": {"task": "banking77"}}}) == "banking77"
    assert request_task({"metadata": {"user_api_key": "x"}}) is None


def test_sync_completion_and_stream_through_litellm(artifacts):
    import litellm

    from routenlp_standins.handler import LocalTiers

    patch = pytest.MonkeyPatch()
    patch.setattr(litellm, "custom_provider_map",
                  [{"provider": "routenlp-local", "custom_handler": LocalTiers(artifacts)}])
    try:
        params = dict(model="routenlp-local/retrieval", metadata={"task": "bitext"},
                      messages=[{"role": "user", "content": "I need to change my shipping address"}],
                      input_cost_per_token=0.0008, output_cost_per_token=0.0008)
        response = litellm.completion(**params)
        chunks = list(litellm.completion(stream=True, **params))
    finally:
        patch.undo()
    text = response.choices[0].message.content
    assert text and "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert len(response.choices[0].logprobs["content"]) == response.usage.completion_tokens
    assert response._hidden_params["response_cost"] > 0


def test_handler_loaded_from_file_the_way_the_proxy_does_shares_the_loaded_tiers(artifacts):
    """The proxy execs handler.py from the config's folder as a new module; the models must not load twice."""
    from litellm.proxy.types_utils.utils import get_instance_fn

    from routenlp_standins.handler import LocalTiers, local_tiers

    from_proxy = get_instance_fn("routenlp_standins.handler.local_tiers",
                                 config_file_path=str(ROOT / "proxy_config.yaml"))
    assert type(from_proxy).__name__ == "LocalTiers" and from_proxy is not local_tiers
    assert from_proxy.smollm() is local_tiers.smollm() is LocalTiers(artifacts).smollm()
    assert from_proxy._task_tier("classifier", "banking77") is local_tiers._task_tier("classifier", "banking77")
