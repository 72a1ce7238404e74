#!/usr/bin/env python3
"""A DeepSpeed training script, run on strata by changing one import.

    PYTHONPATH=python /usr/bin/python3 examples/ds_train.py \
        --deepspeed --deepspeed_config examples/configs/ds_zero2_cpu.json

It is written exactly as for DeepSpeed (initialize -> forward -> backward -> step, with the
batch size, gradient accumulation, schedule and clipping taken from the config), saves a
checkpoint, builds a second engine in the same process that loads it, checks that the second
engine holds the same weights and step, and runs one more optimizer step on both to check that
they stay identical. The only line that differs from a DeepSpeed script is
``import strata as deepspeed``.

The Hugging Face-style arguments (--learning_rate, --per_device_train_batch_size, ...) are what
a config's "auto" values resolve to (examples/configs/ds_hf_auto.json); configs with numbers
ignore them.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import strata as deepspeed  # noqa: E402  (the one change: was `import deepspeed`)

from gpt import GPT, Batches, stdlib_corpus  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="DeepSpeed-style training on strata")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps to train")
    parser.add_argument("--save_dir", default="ds_checkpoints", help="checkpoint folder")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--summary", default=None, help="write a JSON summary here")
    # Hugging Face TrainingArguments names: what "auto" values in a config resolve to.
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--max_steps", type=int, default=20)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


def build_model(args):
    return GPT(d_model=args.d_model, n_layer=args.n_layer, n_head=4, seq_len=args.seq_len,
               dropout=args.dropout)


def run(argv=None):
    args = get_args(argv)
    deepspeed.init_distributed()
    torch.manual_seed(args.seed)
    corpus = stdlib_corpus(max_bytes=256 << 10, seed=args.seed)

    model = build_model(args)
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters())
    data = Batches(corpus, args.seq_len, engine.train_micro_batch_size_per_gpu(), seed=args.seed)

    losses = []
    engine.train()
    for _ in range(args.steps * engine.gradient_accumulation_steps()):
        x, y = data.next()
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if engine.global_rank == 0:
        print(f"trained {engine.global_steps} steps ({engine.micro_steps} micro steps): loss "
              f"{sum(losses[:4]) / 4:.3f} -> {sum(losses[-4:]) / 4:.3f}, lr {engine.get_lr()}, "
              f"grad norm {engine.get_global_grad_norm():.3f}")

    trained = (engine.global_steps, engine.micro_steps)
    engine.save_checkpoint(args.save_dir, client_state={"data_rng": data.gen.get_state(),
                                                        "losses": losses})

    # A second engine in the same process resumes from the checkpoint.
    model2 = build_model(args)
    engine2, optimizer2, _, lr_scheduler2 = deepspeed.initialize(
        args=args, model=model2, model_parameters=model2.parameters())
    load_path, client_state = engine2.load_checkpoint(args.save_dir)
    assert load_path is not None, "nothing loaded"
    assert engine2.global_steps == engine.global_steps
    assert client_state["losses"] == losses
    same_weights = all(torch.equal(a, b) for a, b in zip(engine.module.state_dict().values(),
                                                         engine2.module.state_dict().values()))
    data2 = Batches(corpus, args.seq_len, engine2.train_micro_batch_size_per_gpu(),
                    seed=args.seed)
    data2.gen.set_state(client_state["data_rng"])

    # One more optimizer step on both engines, same batches and the same dropout masks.
    rng = torch.get_rng_state()
    after = []
    for eng, dat in ((engine, data), (engine2, data2)):
        torch.set_rng_state(rng)
        step_losses = []
        for _ in range(eng.gradient_accumulation_steps()):
            x, y = dat.next()
            loss = eng(x, y)
            eng.backward(loss)
            eng.step()
            step_losses.append(loss.item())
        after.append(step_losses)
    same_after = all(torch.equal(a, b) for a, b in zip(engine.module.state_dict().values(),
                                                       engine2.module.state_dict().values()))
    summary = {
        "config": args.deepspeed_config,
        "steps": trained[0],
        "micro_steps": trained[1],
        "losses": losses,
        "lr": engine.get_lr(),
        "param_dtype": str(next(engine.module.parameters()).dtype),
        "swap_file_bytes": getattr(engine, "stats", dict)().get("swap_file_bytes", 0),
        "loaded_from": load_path,
        "same_weights_after_load": same_weights,
        "losses_after_load": after,
        "same_weights_after_next_step": same_after,
    }
    engine.close()
    engine2.close()
    if engine.global_rank == 0:
        print(f"checkpoint {load_path}: second engine "
              f"{'matches' if same_weights and same_after else 'DIFFERS'}")
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def main(argv=None):
    s = run(argv)
    return 0 if s["same_weights_after_load"] and s["same_weights_after_next_step"] else 1


if __name__ == "__main__":
    sys.exit(main())
