"""The pieces of ``python scripts/compare_methods.py``, one concept per module (each imports only those above it):

* :mod:`.stages`: a bundle's config files per method, one training stage, parameter counts and weights digests;
* :mod:`.evaluation`: one model evaluated with the bundle's ``evaluate.json``, its per-case metrics read back;
* :mod:`.tracking`: the MLflow experiment and runs of a comparison;
* :mod:`.plan`: the plan (``plan.json``): settings, evaluated sets, the (ensemble) teacher;
* :mod:`.jobs`: the plan's jobs: names, folders, shell commands (``jobs.sh``), result files;
* :mod:`.runner`: one job run in this process (train, evaluate on every set, ``result.json``);
* :mod:`.summary`: the statistics: mean ± sd over seeds, paired bootstrap CIs, verdicts, gap closed;
* :mod:`.report`: the markdown tables and notes (``results.md``);
* :mod:`.plot`: the plot of one evaluated set (``results_<set>.png``);
* :mod:`.join`: other plans' students as rows of one table (``--collect --join``);
* :mod:`.collect`: the finished jobs into ``results.json``, ``results.md`` and the plots;
* :mod:`.sequential`: the whole comparison in one process (plan, every job, collect).

``scripts/compare_methods.py`` is the command line and re-exports the public names.
"""
