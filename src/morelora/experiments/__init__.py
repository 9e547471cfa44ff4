"""Experiments built on the library: many runs of one setup, trained resumably and compared statistically.

* :mod:`.runs`        the one executor: a planned run's status, train / resume / reuse, test predictions
* :mod:`.statistics`  t-intervals, the paired bootstrap, the combined seeds + examples test, the paired t-test
* :mod:`.compare`     ``morelora compare``: methods (or configs) x seeds, planning and the command line
* :mod:`.plan`        ``morelora compare --plan``: every run's status and the hours it still needs
* :mod:`.report`      a comparison's summary (``results.json``), its tables (``results.md``) and chart
* :mod:`.sweep`       ``morelora sweep``: one config over the values of one parameter x seeds

Nothing here is imported by the training loop, and the modules import torch / matplotlib only inside their
functions, so that building the ``morelora`` argument parser stays cheap.
"""
