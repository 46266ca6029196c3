"""gpt2/optim.py: AdamW's parameter groups and the learning-rate schedules, against transformers'
get_scheduler where it has the same schedule."""

import pytest
import torch

from gpt2 import GPT2, GPT2Config, optim


def test_optimizer_groups_and_schedule():
    model = GPT2(GPT2Config.from_preset("gpt2-tiny").with_overrides("n_layer=1,n_embd=32,vocab_size=64"))
    decay, no_decay = optim.param_groups(model, 0.1)
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = optim.lr_scheduler(optimizer, "cosine", warmup_steps=4, total_steps=14, lr=1.0, min_lr=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.55)  # halfway through the decay: min_lr + (lr - min_lr) / 2
    assert lrs[14:] == pytest.approx([0.1, 0.1])


@pytest.mark.parametrize("kind", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                  "constant_with_warmup", "inverse_sqrt", "warmup_stable_decay"])
def test_schedules_follow_transformers(kind):
    """Each --lr_scheduler_type against transformers' get_scheduler of the same name (an independent
    implementation): equal after warmup; in warmup ours is one step ahead (it starts at 1/warmup,
    not 0). With min_lr = 0, as transformers' schedules end at 0 (polynomial: at its lr_end); with a
    min_lr, every decay ends there and stays."""
    transformers = pytest.importorskip("transformers")
    warmup, total = 6, 50
    ours = optim.WarmupDecay(kind, warmup, total, min_lr_ratio=0.0)
    extra = {"polynomial": {"lr_end": 0.0}, "inverse_sqrt": {"timescale": warmup},
             "warmup_stable_decay": {"num_decay_steps": ours.decay_steps,
                                     "num_stable_steps": total - warmup - ours.decay_steps}}.get(kind, {})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = transformers.get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                                        scheduler_specific_kwargs=extra).lr_lambdas[0]
    for step in range(total + 1):  # (past the end transformers' cosine rises again; ours stays at the floor)
        if kind == "constant" or step >= warmup:
            assert ours(step) == pytest.approx(theirs(step), abs=1e-12), step
        else:
            assert ours(step) == pytest.approx(theirs(step + 1), abs=1e-12), step
    floored = optim.WarmupDecay(kind, warmup, total, min_lr_ratio=0.1)
    if kind not in ("constant", "constant_with_warmup"):
        assert floored(total) == pytest.approx(0.1) or kind == "inverse_sqrt"
        assert min(floored(s) for s in range(warmup, total + 5)) >= 0.1 - 1e-12


def test_build_optimizer_defaults():
    """AdamW with GPT-3's betas over param_groups, warmup 5% of the steps unless given, the
    non-fused implementation on CPU."""
    model = GPT2(GPT2Config.from_preset("gpt2-tiny").with_overrides("n_layer=1,n_embd=32,vocab_size=64"))
    optimizer, scheduler = optim.build_optimizer(model, lr=1e-3, weight_decay=0.1, min_lr=1e-4, schedule="linear",
                                                 total_steps=200, device=torch.device("cpu"))
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["fused"] is False
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert scheduler.lr_lambdas[0].warmup_steps == 10
    _, given = optim.build_optimizer(model, lr=1e-3, weight_decay=0.1, min_lr=0.0, schedule="linear",
                                     total_steps=200, warmup_steps=0)
    assert given.lr_lambdas[0].warmup_steps == 0
    with pytest.raises(ValueError, match="larger than the learning rate"):
        optim.build_optimizer(model, lr=1e-3, weight_decay=0.1, min_lr=1e-2, schedule="cosine", total_steps=10)
