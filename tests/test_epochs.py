"""Epoch choice helpers shared by notebooks 03 and 05."""
import pandas as pd

from ood_lib import epochs


def test_chosen_epochs_and_rows_at():
    results = pd.DataFrame({"seed": [0, 0, 1, 1, 0], "detector": ["energy"] * 4 + ["msp"],
                            "rule": ["final", "ood_val", "final", "ood_val", "final"], "epoch": [30, 8, 30, 12, 5]})
    chosen = epochs.chosen_epochs(results, "energy")
    assert chosen.loc[0, "ood_val"] == 8 and chosen.loc[1, "ood_val"] == 12 and (chosen["final"] == 30).all()
    rows = pd.DataFrame({"seed": [0, 0, 1, 1, 2], "epoch": [8, 12, 8, 12, 8], "value": [1, 2, 3, 4, 5]})
    assert list(epochs.rows_at(rows, chosen["ood_val"]).value) == [1, 4]  # seed 2 has no choice: dropped
    with_blank = rows.assign(epoch=rows.epoch.astype(object)).astype({"epoch": str})
    with_blank.loc[4, "epoch"] = ""  # metrics.csv rows without an epoch never match
    assert list(epochs.rows_at(with_blank, chosen["ood_val"]).value) == [1, 4]
