"""The pieces of ``python scripts/benchmark.py`` and of the other benchmark scripts.

* :mod:`.measure`: timing in interleaved rounds, paired ratios, FLOPs and peak memory (no bundle knowledge);
* :mod:`.bundles`: bundle names and methods, parsed configs, synthetic data and random paraphrasers;
* :mod:`.inference`: teacher and student inference cost;
* :mod:`.training`: the plain student step, the teacher forward and each method's ``DistillationTrainer`` iteration;
* :mod:`.report`: the markdown tables.

``scripts/benchmark.py`` is the command line that puts them together; ``scripts/benchmark_peer.py`` (against
torchdistill) and ``scripts/benchmark_deploy.py`` (exported students) reuse :mod:`.measure`.
"""
