"""Training cases shared by the runtime tests and their worker script (tests/runtime_worker.py).

    case = {"id": "tied_211", "model": "tied_weights", "options": {"plan": {"replicas": [2, 1, 1]}}}
    ref = train_reference(case)                      # plain PyTorch, one process
    got = load_result(out / "tied_211.pt")          # what rank 0 of `rannc run` saved
    assert not compare(ref, got)                     # [] when every number matches

A case trains ``steps`` steps (default 5) on its zoo model with dropout switched off, on a batch
that changes a little each step; SGD with momentum unless ``optimizer`` says adam, adamw, rmsprop,
adagrad or adafactor. Keys:
options (RaNNCModule options), local_batches, autocast ('bf16'), scaler (GradScaler init scale),
deferred (build under deferred_init, then load the reference's initial weights), reload (load
the initial weights after training and report the no-grad loss), start (first step index, for
resumed runs). Script idioms (tests/test_runtime_idioms.py): clip ({"max_norm", "norm_type",
"how": torch | imported | method | filtered}, norms returned per step in ``norms``), clip_value, accumulate
(forwards per optimizer step, each loss divided by it), groups ('hf': no weight decay and another
learning rate for biases and norms), scheduler ('lambda'), input_grad (the first input
requires grad; its gradients per step in ``input_grads``), late_optimizer (the optimizer is made
from the wrapper's parameters after wrapping and not handed to RaNNCModule), reference_microbatches
(the reference runs each batch as that many chunks, as gradient accumulation on one device).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_  # imported before any RaNNCModule exists, as scripts do
from torch.utils import _pytree as pytree

from idiom_models import IDIOM_MODELS
from zoo import ZOO


def no_dropout(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        if isinstance(getattr(mod, "dropout", None), float):
            mod.dropout = 0.0
    return model


def build(case: dict) -> tuple[nn.Module, tuple]:
    torch.manual_seed(case.get("seed", 0))
    local = {**ZOO, **IDIOM_MODELS}
    if case["model"] in local:
        model, batch = local[case["model"]]()
    else:  # third-party models (tests/real_models.py, the `zoo` extra)
        from real_models import REAL_MODELS

        model, batch = REAL_MODELS[case["model"]]()
    return no_dropout(model), batch


def batch_at(batch: tuple, step: int) -> tuple:
    """The case's batch at ``step``: float tensors scaled a little, so every step sees new data."""
    return pytree.tree_map(lambda t: t * (1.0 + 0.05 * step) if isinstance(t, torch.Tensor) and t.is_floating_point()
                           else t, batch)


def make_optimizer(case: dict, params: Any, model: nn.Module | None = None) -> torch.optim.Optimizer:
    if case.get("groups") == "hf":  # the Hugging Face idiom: no decay for biases and norms
        assert model is not None
        plain = [p for n, p in model.named_parameters() if "bias" in n or "norm" in n.lower()]
        decayed = [p for n, p in model.named_parameters() if not ("bias" in n or "norm" in n.lower())]
        # SGD, not AdamW: attention key biases have zero gradient up to rounding, which Adam's
        # normalisation would blow up to lr-sized noise in any two runs that round differently
        return torch.optim.SGD([{"params": decayed, "weight_decay": 0.1},
                                {"params": plain, "weight_decay": 0.0, "lr": 0.1}], lr=0.05, momentum=0.9)
    if case.get("optimizer") == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    if case.get("optimizer") == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if case.get("optimizer") == "rmsprop":
        return torch.optim.RMSprop(params, lr=1e-3, momentum=0.9, weight_decay=0.01)
    if case.get("optimizer") == "adagrad":
        return torch.optim.Adagrad(params, lr=1e-2)
    if case.get("optimizer") == "adafactor":  # not element-wise: zero=1 refuses it
        return torch.optim.Adafactor(params, lr=1e-2)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _autocast(case: dict):
    import contextlib

    if case.get("autocast") == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_scheduler(case: dict, opt: torch.optim.Optimizer) -> Any:
    if case.get("scheduler") == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return None


def _clip(case: dict, model: nn.Module, record: dict) -> None:
    """Gradient clipping exactly as a script writes it (``model`` is what the script holds)."""
    spec = case.get("clip")
    if spec:
        how, max_norm, norm_type = spec.get("how", "torch"), spec["max_norm"], float(spec.get("norm_type", 2.0))
        if how == "method" and hasattr(model, "clip_grad_norm_"):
            norm = model.clip_grad_norm_(max_norm, norm_type=norm_type)
        elif how == "imported":
            norm = clip_grad_norm_(model.parameters(), max_norm, norm_type=norm_type)
        elif how == "filtered":  # a rank whose stage holds no gradient passes an empty list
            norm = clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm, norm_type)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type=norm_type)
        record.setdefault("norms", []).append(float(norm))
    if case.get("clip_value"):
        torch.nn.utils.clip_grad_value_(model.parameters(), case["clip_value"])


def _train(case: dict, model: nn.Module, forward: Any, opt: torch.optim.Optimizer, batch: tuple, rank: int = 0,
           fail_rank: int = -1, save: Any = None, save_at: int = -1, hang_rank: int = -1,
           signal_rank: int = -1, signal_name: str = "", record: dict | None = None) -> list[float]:
    scaler = torch.amp.GradScaler("cpu", init_scale=float(case["scaler"])) if case.get("scaler") else None
    scheduler = make_scheduler(case, opt)
    record = {} if record is None else record
    accumulate = int(case.get("accumulate", 1))
    losses = []
    start = int(case.get("start", 0))
    for step in range(start, start + int(case.get("steps", 5))):
        if step == 2 and rank == fail_rank:
            raise ValueError(f"injected failure on rank {rank} at step {step}")
        if step == 2 and rank == hang_rank:
            import time

            time.sleep(3600)  # stops answering; the others must give up after runtime_timeout
        if step == 2 and rank == signal_rank:
            import signal

            os.kill(os.getpid(), getattr(signal, f"SIG{signal_name}"))  # STOP: a frozen process; KILL: gone
        for micro in range(accumulate):
            args, kwargs = batch_at(batch, step * accumulate + micro if accumulate > 1 else step)
            if case.get("input_grad"):
                args = (args[0].detach().clone().requires_grad_(True), *args[1:])
            with _autocast(case):
                loss = forward(*args, **kwargs)
            scaled = loss / accumulate if accumulate > 1 else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            if case.get("input_grad"):
                record.setdefault("input_grads", []).append(args[0].grad.detach().clone())
            losses.append(float(loss.detach()))
        if scaler is not None:
            if case.get("clip"):
                scaler.unscale_(opt)
            _clip(case, model, record)
            scaler.step(opt)
            scaler.update()
        else:
            _clip(case, model, record)
            opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
            record.setdefault("lrs", []).append([g["lr"] for g in opt.param_groups])
        if save is not None and step + 1 == save_at:
            save()
    return losses


def _evaluate(forward: Any, module: nn.Module, batch: tuple) -> dict[str, float]:
    args, kwargs = batch
    with torch.no_grad():
        no_grad = float(forward(*args, **kwargs))
        module.eval()
        evaluated = float(forward(*args, **kwargs))
        module.train()
    return {"no_grad": no_grad, "eval": evaluated}


def microbatched(model: nn.Module, microbatches: int) -> Any:
    """A single-device forward that runs the batch as ``microbatches`` contiguous chunks in order and
    returns the sum of their losses weighted by chunk size / batch size (gradient accumulation)."""
    from rannc_cli.graph.capture import guess_batch_size
    from rannc_cli.runtime.microbatch import split_sizes

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        size = guess_batch_size(args, kwargs)
        total, start = None, 0
        for n in split_sizes(size, microbatches):
            a, k = pytree.tree_map(lambda t: t[start:start + n] if isinstance(t, torch.Tensor) and t.dim() > 0
                                   and t.shape[0] == size else t, (args, kwargs))
            part = model(*a, **k) * (n / size)
            total = part if total is None else total + part
            start += n
        return total

    return forward


def train_reference(case: dict) -> dict[str, Any]:
    model, batch = build(case)
    initial = copy.deepcopy(model.state_dict())
    opt = make_optimizer(case, model.parameters(), model)
    record: dict[str, Any] = {}
    forward = microbatched(model, case["reference_microbatches"]) if case.get("reference_microbatches") else model
    losses = _train(case, model, forward, opt, batch, record=record)
    result = {"losses": losses, "state": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
              **_evaluate(forward, model, batch), **record, "names": [n for n, _ in model.named_parameters()]}
    if case.get("reload"):
        model.load_state_dict(initial)
        with torch.no_grad():
            result["reloaded"] = float(model(*batch[0], **batch[1]))
    return result


def local_share(batch: tuple, rank: int, world: int) -> tuple:
    """This rank's contiguous share of every batch tensor (local_batches mode)."""
    from rannc_cli.graph.capture import guess_batch_size
    from rannc_cli.runtime.microbatch import split_sizes

    size = guess_batch_size(*batch)
    sizes = split_sizes(size, world)
    start = sum(sizes[:rank])
    return pytree.tree_map(lambda t: t[start:start + sizes[rank]] if isinstance(t, torch.Tensor) and t.dim() > 0
                           and t.shape[0] == size else t, batch)


def train_distributed(case: dict, rank: int, fail_rank: int = -1, resume: str = "", save_at: int = -1,
                      checkpoint_dir: Path | None = None, hang_rank: int = -1, signal_rank: int = -1,
                      signal_name: str = "") -> dict[str, Any]:
    from rannc_cli import RaNNCModule, deferred_init

    if case.get("deferred"):
        reference_model, batch = build(case)
        initial = copy.deepcopy(reference_model.state_dict())
        with deferred_init():
            model, _ = build(case)
    else:
        model, batch = build(case)
        initial = copy.deepcopy(model.state_dict())
    options = dict(case.get("options", {}))
    options.setdefault("quiet", True)
    if case.get("local_batches"):
        options["local_batches"] = True
    if case.get("late_optimizer"):  # built from the wrapper's parameters, not handed to RaNNCModule
        wrapped = RaNNCModule(model, **options)
        opt = make_optimizer(case, wrapped.parameters(), wrapped)
    else:
        opt = make_optimizer(case, model.parameters(), model)
        wrapped = RaNNCModule(model, opt, **options)
    if resume:
        wrapped.load_checkpoint(resume)
    total = sum(p.numel() for p in model.parameters())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_batch = local_share(batch, rank, world) if case.get("local_batches") else batch
    if case.get("deferred"):
        with torch.no_grad():
            wrapped(*local_batch[0], **local_batch[1])  # first forward: plan, materialise this rank's stage
        wrapped.load_state_dict(initial)
    forward = wrapped

    def step_batch_forward(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    if case.get("local_batches"):
        def step_batch_forward(*args: Any, **kwargs: Any) -> Any:  # noqa: F811
            a, k = local_share((args, kwargs), rank, world)
            return forward(*a, **k)

    record: dict[str, Any] = {}
    losses = _train(case, wrapped, step_batch_forward, opt, batch, rank, fail_rank,
                    save=(lambda: wrapped.save_checkpoint(checkpoint_dir)) if checkpoint_dir else None,
                    save_at=save_at, hang_rank=hang_rank, signal_rank=signal_rank, signal_name=signal_name,
                    record=record)
    held = sum(p.numel() for p in model.parameters())  # non-local parameters are freed after planning
    held_by_rank: list[Any] = [None] * world
    if world > 1:
        import torch.distributed as dist

        dist.all_gather_object(held_by_rank, held)
    from rannc_cli.runtime.zero import optimizer_state_bytes

    state_bytes_by_rank: list[Any] = [optimizer_state_bytes(opt)] * world  # optimizer state held by each rank
    if world > 1:
        dist.all_gather_object(state_bytes_by_rank, state_bytes_by_rank[0])
    result: dict[str, Any] = {"losses": losses, "state": wrapped.state_dict(), "optimizer": opt.state_dict(),
                              **_evaluate(step_batch_forward, wrapped, batch), "held_numel": held, "held_by_rank": held_by_rank,
                              "state_bytes_by_rank": state_bytes_by_rank,
                              "buckets": _bucket_counts(wrapped),
                              "total_numel": total, **record, "names": [n for n, _ in wrapped.named_parameters()]}
    if case.get("reload"):
        wrapped.load_state_dict(initial)
        with torch.no_grad():
            result["reloaded"] = float(step_batch_forward(*batch[0], **batch[1]))
    return result


def _bucket_counts(wrapped: Any) -> tuple[int, int] | None:
    """(buckets launched during the last backward, all buckets) of an overlapping reducer, else None."""
    reducer = getattr(getattr(wrapped, "_engine", None), "reducer", None)
    return (reducer.early, len(reducer.buckets)) if hasattr(reducer, "early") else None


def save_result(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(result, tmp)
    os.replace(tmp, path)


def load_result(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> tuple[bool, float]:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return False, float("inf")
    same = torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    finite = torch.isfinite(a) & torch.isfinite(b)
    diff = float((a - b)[finite].abs().max()) if finite.any() else 0.0
    return bool(same.all()), diff


def compare(ref: dict, got: dict, rtol: float = 1e-5, atol: float = 1e-6, keys: tuple = ("losses", "state",
            "no_grad", "eval")) -> tuple[list[str], float]:
    """Mismatches between a reference and a distributed result, and the largest absolute difference."""
    bad: list[str] = []
    worst = 0.0
    if "losses" in keys:
        ok, diff = _close(torch.tensor(ref["losses"]), torch.tensor(got["losses"]), rtol, atol)
        worst = max(worst, diff)
        if not ok:
            bad.append(f"losses differ: {ref['losses']} vs {got['losses']}")
    if "state" in keys:
        if list(ref["state"]) != list(got["state"]):
            bad.append(f"state dict keys differ: {list(ref['state'])} vs {list(got['state'])}")
        for k, v in ref["state"].items():
            if k in got["state"]:
                ok, diff = _close(v, got["state"][k], rtol, atol)
                worst = max(worst, diff)
                if not ok:
                    bad.append(f"{k} differs by {diff:.3g}")
    for k in ("norms", "input_grads", "lrs"):
        if k in keys:
            if len(ref.get(k, [])) != len(got.get(k, [])) or not ref.get(k):
                bad.append(f"{k}: {len(ref.get(k, []))} reference values, {len(got.get(k, []))} distributed")
                continue
            for i, (a, b) in enumerate(zip(ref[k], got[k])):
                ok, diff = _close(torch.as_tensor(a), torch.as_tensor(b), rtol, atol)
                worst = max(worst, diff)
                if not ok:
                    bad.append(f"{k}[{i}] differs by {diff:.3g}: {a if k != 'input_grads' else '...'} vs "
                               f"{b if k != 'input_grads' else '...'}")
    for k in ("no_grad", "eval", "reloaded"):
        if k in keys and k in ref:
            ok, diff = _close(torch.tensor(ref[k]), torch.tensor(got[k]), rtol, atol)
            worst = max(worst, diff)
            if not ok:
                bad.append(f"{k} loss differs: {ref[k]} vs {got[k]}")
    if "optimizer" in keys:
        rs, gs = ref["optimizer"]["state"], got["optimizer"]["state"]
        if sorted(rs) != sorted(gs):
            bad.append(f"optimizer state indices differ: {sorted(rs)} vs {sorted(gs)}")
        for idx, st in rs.items():
            for name, v in st.items():
                if isinstance(v, torch.Tensor) and idx in gs:
                    ok, diff = _close(v, gs[idx][name], rtol, atol)
                    worst = max(worst, diff)
                    if not ok:
                        bad.append(f"optimizer state {idx}.{name} differs by {diff:.3g}")
    return bad, worst
