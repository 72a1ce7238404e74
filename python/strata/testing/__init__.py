"""Test hooks that production code calls and that cost nothing unless a test arms them
(``kill_points``: ``STRATA_TEST_KILL_AT``)."""
