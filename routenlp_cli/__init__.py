"""The ``routenlp`` command line and the demo: the top layer, outside the serving package, free to use every
offline package (``coopt``, ``calibration``, ``routenlp_standins``)."""
