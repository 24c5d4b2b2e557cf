"""The nightly: build, test, benchmark, wheels, cluster; one report per run.

* :mod:`plexilab.nightly.config`: what a nightly was asked to do (steps, skip,
  cluster size, faults, factor);
* :mod:`plexilab.nightly.plan`: which cluster task the checkout has and what to
  hand it, from the checkout's own options schema (``python -m
  plexilab.options``), never from ``invoke --help``;
* :mod:`plexilab.nightly.run`: the steps, the verdict, ``nightly.json``, the
  report and the history;
* :mod:`plexilab.nightly.schedule`: a systemd timer where systemd runs, the
  documented crontab line otherwise.
"""
