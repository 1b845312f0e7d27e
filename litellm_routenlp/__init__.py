"""litellm-routenlp: RouteNLP difficulty routing and conformal cascading inside the LiteLLM proxy.

Add ``litellm_routenlp.proxy_hook.routenlp`` to ``litellm_settings.callbacks`` and a
``routenlp_settings`` section to the proxy config (see README).  Nothing here imports torch.
"""

__version__ = "0.1.0"
