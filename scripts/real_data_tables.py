"""Tables of docs/real_data.md from the results of ``covvae compare --dataset ztf``.

Each argument is the ``results.json`` of one run (``--stamp-channels
difference`` and ``all``); the script prints the page's Markdown tables:
the labels, the features and anomaly table over both runs, and the
per-channel density and neighbour correlation. Cells are mean ± std over
the runs' seeds (ddof=1).

Usage::

    python scripts/real_data_tables.py docs/results/real_data/difference.json \\
        docs/results/real_data/all.json
"""

import argparse
import json
from pathlib import Path

from sk_covvae._show_versions import markdown_table
from sk_covvae.report import _cell, _channel_rows


def _rows(document):
    channels = document["config"]["data_options"].get("channels", "all")
    for row in document["summary"]:
        yield channels, row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args(argv)
    documents = [json.loads(path.read_text()) for path in args.results]

    print(
        f"<!-- made by: python scripts/real_data_tables.py "
        f"{' '.join(map(str, args.results))} -->\n"
    )
    for doc in documents:
        config, hw = doc["config"], doc["hardware"]
        print(
            f"* `{config['command']}`: {config['description']}; split sizes "
            f"{config['split_sizes']}; seeds {config['seeds']}; wall time "
            f"{doc['wall_time_s'] / 60:.0f} min on {hw['processor']} "
            f"({hw['cpu_count']} CPUs, torch {hw['torch']}, "
            f"{hw['torch_threads']} thread)."
        )
    print()

    table = []
    for doc in documents:
        for channels, row in _rows(doc):
            table.append({"channels": channels, **row})
    cell = _cell(".3f")
    print("**Real/bogus and anomaly detection** (test split, grouped by object)\n")
    print(
        markdown_table(
            table,
            [
                ("channels", "channels"),
                ("features / model", "method"),
                ("active", "n_active", _cell(".1f")),
                ("RF ROC AUC", "rf_roc_auc", cell),
                ("RF on latents + ELBO + MSE", "rf_plus_roc_auc", cell),
                ("anomaly AUROC", "anomaly_auroc", cell),
                ("active (anomaly model)", "anomaly_n_active", _cell(".1f")),
                ("median -ELBO", "neg_elbo_median", _cell(".1f")),
                ("epochs", "epochs", _cell(".0f")),
            ],
        )
    )
    print()
    print("**Per channel** (all three channels, test split)\n")
    chan = [
        {"channels": channels, **row}
        for doc in documents
        for channels in [doc["config"]["data_options"].get("channels", "all")]
        for row in _channel_rows(doc["summary"])
    ]
    print(
        markdown_table(
            chan,
            [
                ("channels", "channels"),
                ("model", "method"),
                ("channel", "channel"),
                ("-log p / pixel (nats)", "nll_per_pixel", cell),
                ("measured x", "measured_corr_x", cell),
                ("learned x", "learned_corr_x", cell),
                ("measured y", "measured_corr_y", cell),
                ("learned y", "learned_corr_y", cell),
            ],
        )
    )


if __name__ == "__main__":
    main()
