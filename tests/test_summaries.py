"""`dynascope analyze` states findings: each summary line is derived from the result."""
from __future__ import annotations

import numpy as np
import xarray as xr

from dynascope.analysis import ANALYSES


def test_opposing_groups_summary_names_classes_sizes_and_steps():
    r = xr.Dataset({
        "group_class": ("group", [0, 3, 1]), "group_size": ("group", [7, 5, 9]),
        "group_a": ("opposition", [0]), "group_b": ("opposition", [2]),
        "gradient_cosine": ("opposition", [-0.81]),
        "strongest_step": (("opposition", "rank"), [[40, 12, 8, 4, 0]]),
    })
    line = ANALYSES["opposing_groups"].summary(r)
    assert line == ("1 opposing pair(s) of groups: group 0 (class 0, 7 ex.) vs group 2 (class 1, 9 ex.), "
                    "grad cos -0.81, strongest at steps 40, 12, 8")
    empty = r.isel(opposition=slice(0, 0))
    assert ANALYSES["opposing_groups"].summary(empty) == "no opposing group pairs at these thresholds"


def test_opposing_pairs_summary_picks_the_busiest_class_pair():
    m = np.zeros((3, 3))
    m[1, 2] = m[2, 1] = 4
    m[0, 1] = m[1, 0] = 1
    r = xr.Dataset({"cosine": ("pair", [-0.6, -0.9, -0.7, -0.8, -0.55]),
                    "class_pair_count": (("class_a", "class_b"), m)})
    assert ANALYSES["opposing_pairs"].summary(r) == \
        "5 opposing pairs (min cosine -0.90); most between classes 1 and 2 (4)"


def test_forgetting_summary_counts():
    r = xr.Dataset({"forgetting_events": ("example", [0.0, 2.0, 1.0, np.inf]),
                    "unforgettable": ("example", [True, False, False, False]),
                    "never_learned": ("example", [False, False, False, True])})
    want = ("1 unforgettable, 1 never learned; mean 1.00 forgetting events per learned example "
            "(never-learned examples excluded from the mean)")
    assert ANALYSES["forgetting"].summary(r) == want
    # the default convention counts a never-learned example's presentations; the mean still excludes it
    r["forgetting_events"] = ("example", [0.0, 2.0, 1.0, 7.0])
    assert ANALYSES["forgetting"].summary(r) == want
