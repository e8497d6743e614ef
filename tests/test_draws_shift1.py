"""Calibration from one or two prompts at shift 1 (four draws of each size, 2x; tests/draws_common.py): never
more than 0.25 dB below evenly spaced caching on held-out seeds, and a searched set kept where they rate it 3 dB or
more above it."""

from draws_common import digits, draw_tests, draws  # noqa: F401 (the module's fixtures)

test_one_or_two_prompts_never_lose_to_evenly_spaced_caching, test_one_or_two_prompts_keep_a_clear_win = draw_tests(
    1.0, ("draw 3, N = 2: the held-out seeds rate the searched set 3.4 dB over evenly spaced caching, the two "
    "samples do not resolve it (the goal's shortfall; docs/calibration.md, 'Error rates over many draws')"))
