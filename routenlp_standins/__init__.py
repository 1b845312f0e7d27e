"""Offline stand-ins for the four RouteNLP cost tiers, served in-process by LiteLLM.

``routenlp-local/<tier>`` deployments are answered by :mod:`routenlp_standins.handler`:

- T1 ``classifier``: MiniLM embeddings + logistic-regression head (stand-in for a fine-tuned classifier);
- T2 ``smollm2``: the real SmolLM2-135M-Instruct (stand-in for a small served model);
- T3 ``retrieval``: k-NN over train-split embeddings (stand-in for a 7B model on vLLM);
- T4 ``replay``: recorded reference answers (stand-in for a frontier API; real use: ``openai/...``).

None of them is the model it stands in for; figures measured with them describe this offline setup.
Artifacts are built by ``python -m routenlp_standins build`` (see :mod:`routenlp_standins.build`).
Importing this package loads nothing heavy, and it defines nothing (everything lives in the
submodules): litellm, torch and the artifacts load on first use.
"""
