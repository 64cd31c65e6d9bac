"""The benchmark suite of ``sk_covvae``, a package in the manner of
scikit-learn's ``asv_benchmarks/benchmarks/``: a harness (``common.py``) and
one module per area (``bench_distributions``, ``bench_fit``,
``bench_inference``, ``bench_datasets``). Run ``python benchmarks/run.py``;
``benchmarks/README.md`` says what each line measures.
"""
