"""Test hooks that production code calls and that cost nothing unless a test arms them
(``kill_points``: ``STRATA_TEST_KILL_AT``; ``emulated_device``: the GPU data flow of ZeRO
stage 3 on the host)."""

import contextlib


@contextlib.contextmanager
def emulated_device(delay_s=0.001, made=None):
    """Stage 3 engines initialised inside the block compute on a host emulation of a GPU
    (``strata.device_lanes.HostEmulatedLanes``): weights copied "H2D" on a lane of their own,
    gradients "D2H" on another, each copy after ``delay_s``. ``made`` (a list) gets each
    Lanes built, for its stats."""
    from .. import param_tier
    from ..device_lanes import HostEmulatedLanes

    def make(device):
        lanes = HostEmulatedLanes(delay_s=delay_s)
        if made is not None:
            made.append(lanes)
        return lanes

    old = param_tier._lanes_factory
    param_tier._lanes_factory = make
    try:
        yield
    finally:
        param_tier._lanes_factory = old
