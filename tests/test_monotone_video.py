"""Never worse with more compute on the bundled video model (tests/test_monotone.py's property; a file of its own so
that it runs beside the image model's on another worker)."""

from test_monotone import check_more_compute


def test_more_compute_is_never_worse_on_held_out_seeds_video():
    check_more_compute("moving-digits", 2, 4, 1.0)
