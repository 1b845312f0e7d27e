"""``routenlp bench``: the paper's evaluation (Tables 2, 4, 12, 13) on any all-pairs data.

Modules: :mod:`.data` (records as arrays, cached embeddings, splits), :mod:`.systems` (the router
interface, the registry and the fixed reference systems), :mod:`.routenlp` (RouteNLP through the
proxy's own code), :mod:`.baselines` (FrugalGPT, Hybrid LLM, RouteLLM, AutoMix, kNN),
:mod:`.metrics`, :mod:`.queueing` (M/M/c tiers), :mod:`.bootstrap`, :mod:`.report`, :mod:`.run`
(orchestration) and :mod:`.datasets` (the shared sets by name).
"""
