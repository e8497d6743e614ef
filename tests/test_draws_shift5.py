"""Calibration from one or two prompts at shift 5 (four draws of each size, 2x; tests/draws_common.py): never
more than 0.25 dB below evenly spaced caching on held-out seeds, and a searched set kept where they rate it 3 dB or
more above it."""

from draws_common import digits, draw_tests, draws  # noqa: F401 (the module's fixtures)

test_one_or_two_prompts_never_lose_to_evenly_spaced_caching, test_one_or_two_prompts_keep_a_clear_win = draw_tests(
    5.0, ("draw 3, N = 2: two samples rate the searched set +1.3 dB over evenly spaced caching (+2.9 rectified), the "
    "held-out seeds +11: no decision from these two samples keeps it"))
