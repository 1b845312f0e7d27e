"""The foundation every other package builds on: the enterprise tasks and their metrics, where the data
lives, the all-pairs format and portfolio, and file hashing.  It imports no other package of this project;
``litellm_routenlp`` (serving), ``routenlp_standins``, ``calibration``, ``coopt`` and ``routenlp_cli``
depend downward on it."""
