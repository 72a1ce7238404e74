"""Two ranks (torch.distributed, gloo on CPU, as torchrun would launch them): gradients are
averaged across ranks before the global-norm clip and the update, so both ranks end with the
weights of one process that trained on the whole batch."""

import os
import socket
import subprocess
import sys

import torch
import torch.nn as nn

import strata as deepspeed

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "workers"))

import dist_train  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_average_gradients_and_match_one_process(tmp_path):
    port = free_port()
    out = str(tmp_path / "out")
    ckpt = str(tmp_path / "ckpt")
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.pop("STRATA_TEST_KILL_AT", None)
        procs.append(subprocess.Popen([sys.executable, dist_train.__file__, out, ckpt], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")

    # One process, the whole batch, the same config with micro batch 8.
    cfg = dict(dist_train.CONFIG, train_micro_batch_size_per_gpu=8)
    model = dist_train.make_model()
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    try:
        norms = []
        for step in range(5):
            x, y = dist_train.global_batch(step)
            engine.backward(nn.functional.cross_entropy(engine(x), y))
            engine.step()
            norms.append(engine.get_global_grad_norm())
        for k, v in model.state_dict().items():
            assert torch.equal(r0["model"][k], r1["model"][k]), k
            torch.testing.assert_close(r0["model"][k], v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(r0["norms"]), torch.tensor(norms), rtol=1e-5,
                                   atol=1e-6)
        assert max(norms) > 0.5, "clipping acted"
        # Rank 0 wrote the (replicated) checkpoint; a single process can load it.
        path, _ = engine.load_checkpoint(ckpt)
        assert path is not None
        for k, v in model.state_dict().items():
            assert torch.equal(v, r0["model"][k])
    finally:
        engine.close()
