"""The distributed side of RaNNCModule: set up once, then run one training step per forward.

    engine = Engine(model, optimizer, env, options)       # joins the process group
    loss = engine.forward(args, kwargs)                   # whole schedule, gradients all-reduced
    loss.backward()                                       # gradients become visible in .grad

Why the whole step runs inside ``forward``: with 1F1B, backwards of early microbatches must run
before forwards of later ones, so the schedule cannot be split at the point where the user calls
``backward``. ``forward`` therefore runs every forward and backward of the schedule (seeded with
the loss gradient the last ``backward`` used, 1.0 at first), all-reduces the gradients, and
returns the loss through an autograd function whose backward adds ``grad_output / seed`` times
those gradients to ``.grad``. Plain ``loss.backward()`` (factor 1) and GradScaler (power-of-two
factors, normally 1 after the first step) are exact; a forward whose loss is never backwarded
leaves ``.grad`` untouched; gradient accumulation over several forwards works as in PyTorch.
Inputs that require grad get theirs the same way: each stage replica adds the gradient of the
slice it read into a full-size buffer, the buffers are summed over the world, and backward hands
them to the inputs.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from rannc_cli.errors import RanncError
from rannc_cli.graph.blocks import BlockGraph, build_blocks, graph_hash
from rannc_cli.graph.capture import capture, guess_batch_size
from rannc_cli.graph.stages import StageModule, build_stages
from rannc_cli.planner.plan import Plan
from rannc_cli.runtime.allreduce import GradReducer
from rannc_cli.runtime.env import DistEnv, device_for, init_distributed
from rannc_cli.runtime.executor import Executor
from rannc_cli.runtime.groups import Layout, make_groups
from rannc_cli.runtime.planning import Constraints, obtain_plan


class PeerLost(RanncError):
    """Another rank stopped answering (it most likely failed; its own error says why)."""

    exit_code = 3


_COMM_ERRORS = ("Connection closed", "Connection reset", "Broken pipe", "Timed out", "timed out", "timeout", "Gloo", "NCCL",
                "ProcessGroup", "Socket", "socket", "peer", "pair closure")


def _is_comm_error(exc: BaseException) -> bool:
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _COMM_ERRORS)


def _install_excepthook() -> None:
    """Uncaught RanncErrors print one line and exit with their code (no traceback)."""
    if getattr(sys.excepthook, "_rannc", False):
        return
    previous = sys.excepthook

    def hook(kind, exc, tb):  # type: ignore[no-untyped-def]
        if isinstance(exc, RanncError):
            import os

            if not getattr(exc, "silent", False):  # silent: another rank reports the same error
                print(f"error: {exc.one_line()}", file=sys.stderr, flush=True)
            if exc.cause is not None and os.environ.get("RANNC_DEBUG"):
                import traceback

                traceback.print_exception(exc.cause)
            os._exit(exc.exit_code)
        previous(kind, exc, tb)

    hook._rannc = True  # type: ignore[attr-defined]
    sys.excepthook = hook


@dataclass
class Mode:
    """Graph, stages and executor for one of train() / eval()."""

    bg: BlockGraph
    stages: list[StageModule]
    executor: Executor


class _PipelineLoss(torch.autograd.Function):
    """Returns the loss; its backward hands the precomputed gradients to the engine."""

    @staticmethod
    def forward(ctx, anchor, loss, engine, pending, seed, input_grads, *inputs):  # type: ignore[override]
        ctx.engine, ctx.pending, ctx.seed, ctx.input_grads = engine, pending, seed, input_grads
        ctx.devices = [x.device for x in inputs]
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        factor = float(grad_output)
        ctx.engine.apply_grads(ctx.pending, factor, ctx.seed)
        to_inputs = tuple((g * (factor / ctx.seed)).to(d) for g, d in zip(ctx.input_grads, ctx.devices))
        return (None, None, None, None, None, None) + to_inputs


class Engine:
    """See the module docstring."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, env: DistEnv,
                 options: dict[str, Any]):
        from rannc_cli.config import settings

        self.model = model
        self.optimizer = optimizer
        self.env = env
        self.rank, self.world = env.rank, env.world_size
        self.local_batches = bool(options.pop("local_batches", False))
        self.loss_reduction = str(settings.value("loss_reduction", options.pop("loss_reduction", None),
                                                 "RaNNCModule(loss_reduction={})"))
        self.batchnorm = str(settings.value("batchnorm", options.pop("batchnorm", None), "RaNNCModule(batchnorm={})"))
        self.constraints = Constraints.from_settings(**options)
        if self.constraints.extra:
            raise RanncError(f"unknown RaNNCModule option(s): {', '.join(sorted(self.constraints.extra))}",
                             hint="see docs/runtime.md for the options")
        self.timeout = datetime.timedelta(seconds=float(settings.get("runtime_timeout")))
        self.device = device_for(env)
        init_distributed(env, self.device)
        from rannc_cli.runtime import heartbeat

        heartbeat.start(env.rank, env.world_size)  # from now on a stopped rank is named within hang_timeout_seconds
        _install_excepthook()  # after init_process_group, whose own hook would swallow our line
        from rannc_cli.runtime import clipping

        clipping.register(self)  # torch.nn.utils.clip_grad_norm_ on this model's parameters becomes global
        from rannc_cli.runtime.deferred import give_storage, meta_parameters

        deferred = meta_parameters(model)
        self.deferred = {id(p) for p in deferred}
        give_storage(deferred)  # uninitialised, untouched memory until planning frees the other stages'
        self.state_keys = list(model.state_dict(keep_vars=True).keys())
        self.plan: Plan | None = None
        self.layout: Layout | None = None
        self.modes: dict[bool, Mode] = {}
        self.step = 0
        self.rng_base = 0
        self.seed_scale = 1.0
        self.scaled = False
        self.anchor = torch.zeros((), requires_grad=True)
        self.holders: dict[int, tuple[int, ...]] = {}  # id(tensor) -> ranks holding it
        self.local: list[nn.Parameter] = []
        self.freed: dict[int, tuple[nn.Parameter, torch.Size]] = {}
        self.reducer: GradReducer | Any = None  # OverlapReducer with plan.allreduce_overlap
        self.zero: Any = None  # ZeroSharding (runtime/zero.py) with plan.zero == 1
        self.groups: dict[tuple[int, ...], Any] = {}
        self.placeholder: nn.Parameter | None = None
        self.resume_from: str | None = None
        self._checked_inputs = False
        # preemption and requeue (rannc_cli/runtime/preempt.py)
        from rannc_cli.runtime.preempt import Preemption, checkpoint_root

        self.losses: list[float] = []  # every trained step's loss, kept in checkpoints for replay
        self.ckpt_root = checkpoint_root()
        self.watch = Preemption.install() if self.ckpt_root is not None else None
        self.stop_agreed = False  # some rank got SIGUSR1: checkpoint after this step and exit
        self.replay_until = 0  # training forwards to replay after a resume (steps already trained)
        self.replayed = 0
        self.in_replay = False

    # ------------------------------------------------------------------ setup
    def _batch(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The global batch: as given (default) or concatenated from every rank's (local_batches)."""
        if not self.local_batches:
            return args, kwargs
        leaves, spec = pytree.tree_flatten((args, kwargs))
        size = guess_batch_size(args, kwargs)
        mine = {i: t.detach().cpu() for i, t in enumerate(leaves)
                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size}
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        for i in mine:
            leaves[i] = torch.cat([part[i] for part in everyone], dim=0).to(leaves[i].device)
        return pytree.tree_unflatten(leaves, spec)

    def _check_same_batch(self, args: tuple, kwargs: dict) -> None:
        sums = []
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                sums.append((tuple(t.shape), float(t.detach().double().sum()) if t.numel() else 0.0))
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, sums)
        bad = [r for r, s in enumerate(everyone) if s != everyone[0]]
        if bad:
            raise RanncError(f"rank {bad[0]} passed a different batch than rank 0; by default every rank must pass "
                             "the same global batch",
                             hint="pass the same batch on every rank, or use RaNNCModule(..., local_batches=True) "
                                  "when each rank loads its own share")

    @contextlib.contextmanager
    def _capture_view(self) -> Iterator[None]:
        """The whole model on the CPU while it is captured or profiled on rank 0.

        Freed parameters get their shapes back and tensors this rank moved to its GPU are shadowed,
        both by untouched CPU memory (capture reads shapes, not values): one capture device, so the
        graph is the same on every rank and its device constants are the CPU's (StageModule.place
        retargets them)."""
        shadowed: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen: set[int] = set()
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            if id(t) in self.freed:
                shadowed.append((t, t.data))
                t.data = torch.empty(self.freed[id(t)][1], dtype=t.dtype)
            elif t.device.type not in ("cpu", "meta"):
                shadowed.append((t, t.data))
                t.data = torch.empty(t.shape, dtype=t.dtype)
        try:
            yield
        finally:
            for t, data in shadowed:
                t.data = data

    @staticmethod
    def _on_cpu(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The batch as the capture sees it (see _capture_view): tensors on the CPU."""
        return torch.utils._pytree.tree_map(
            lambda t: t.cpu() if isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta") else t,
            (tuple(args), dict(kwargs)))

    def _capture(self, args: tuple, kwargs: dict) -> BlockGraph:
        with self._capture_view():
            return build_blocks(capture(self.model, *self._on_cpu(args, kwargs)))

    def _mode(self, args: tuple, kwargs: dict) -> Mode:
        training = self.model.training
        if training in self.modes:
            return self.modes[training]
        bg = self._capture(args, kwargs)
        if self.plan is None:
            self._setup(bg, args, kwargs)
        assert self.plan is not None and self.layout is not None
        if training and self.plan.graph_hash and self.plan.graph_hash != graph_hash(bg):
            raise RanncError(f"the plan was made for another model graph ({self.plan.model or '?'}, graph "
                             f"{self.plan.graph_hash}); this model's graph is {graph_hash(bg)}",
                             hint="profile and plan this model again (rannc profile, rannc plan) or drop RANNC_PLAN")
        if self.plan.stages[-1].end != len(bg.blocks):
            raise RanncError(f"the model has {len(bg.blocks)} blocks in {'train' if training else 'eval'} mode but "
                             f"{self.plan.stages[-1].end} in the mode it was planned in",
                             hint="run the first forward in the mode you use most, or use a plan per mode")
        assignment = [i for i, st in enumerate(self.plan.stages) for _ in range(st.start, st.end)]
        stages = build_stages(bg, assignment)
        mine = [s for s, _ in self.layout.roles(self.rank)]  # one stage, or v with an interleaved plan
        for s in mine if self.modes else []:
            known = {id(p) for p in self.local}
            extra = [n for n, p in stages[s].graph_module.named_parameters() if id(p) not in known]
            if extra:
                raise RanncError(f"stage {s} needs parameters in {'train' if training else 'eval'} mode that "
                                 f"it does not hold in the other mode ({extra[0]})", hint="please report this model")
        if training:
            self._batch_norm_note(stages)
        for s in mine:
            stages[s].place(self.device)
            self._batch_norm(stages[s], training)
        ex = Executor(bg, stages, self.layout, self.rank, self.device, self.plan.schedule, self.plan.microbatches,
                      [st.checkpoint for st in self.plan.stages], self.loss_reduction, self.rng_base)
        self.modes[training] = Mode(bg, stages, ex)
        return self.modes[training]

    def _batch_norm(self, stage: StageModule, training: bool) -> None:
        """batchnorm='sync' and a replicated stage: its BatchNorms take statistics over all its replicas."""
        from rannc_cli.runtime.syncbn import sync_batch_norm

        assert self.plan is not None and self.layout is not None
        if not training:
            return
        ranks = tuple(sorted(self.layout.stage_ranks[stage.index]))
        if self.batchnorm == "sync" and len(ranks) > 1:
            sync_batch_norm(stage.graph_module, self.groups[ranks])

    def _batch_norm_note(self, stages: list[StageModule]) -> None:
        """Rank 0 says once how BatchNorm statistics differ from one device under this plan."""
        from rannc_cli.runtime.batchnorm import slicing_warning

        assert self.plan is not None
        if self.rank != 0 or self.constraints.quiet:
            return
        text = slicing_warning(stages, self.plan, self.batchnorm)
        if text:
            print(text, file=sys.stderr, flush=True)

    def _setup(self, bg: BlockGraph, args: tuple, kwargs: dict) -> None:
        """Plan (or load the plan), place parameters, make groups, trim the optimizer."""
        batch_size = bg.captured.batch_size
        c = self.constraints
        from pathlib import Path

        auto = None
        if self.resume_from is not None:
            c.plan = Path(self.resume_from) / "plan.yaml"
        elif self.ckpt_root is not None:
            from rannc_cli.runtime.preempt import latest_checkpoint

            auto = latest_checkpoint(self.ckpt_root)
            same_shape = auto is not None and auto[1]["world_size"] == self.world and \
                auto[1]["local_world_size"] == self.env.local_world_size
            if same_shape and c.plan is None:
                c.plan = auto[0] / "plan.yaml"  # no plan given: keep the checkpoint's
        with self._capture_view():
            self.plan, self.rng_base = obtain_plan(self.model, *self._on_cpu(args, kwargs), len(bg.blocks), batch_size,
                                                   self.env, self.device, c, estimate=bool(self.deferred))
        self.layout = Layout.from_plan(self.plan, self.world, self.env.local_world_size)
        if self.rank == 0 and not self.constraints.quiet:
            parts = " | ".join(f"{st.start}-{st.end - 1} x{st.replicas}{' ckpt' if st.checkpoint else ''}"
                               for st in self.plan.stages)
            extras = "".join([f" v={self.plan.virtual_stages}" if self.plan.virtual_stages > 1 else "",
                              ", ZeRO-1" if self.plan.zero else "",
                              ", all-reduce overlapped" if self.plan.allreduce_overlap else ""])
            print(f"rannc: plan {len(self.plan.stages)} stage(s) [blocks {parts}], {self.plan.microbatches} "
                  f"microbatch(es), {self.plan.schedule}{extras}, {self.world} process(es), {self.device.type}",
                  file=sys.stderr, flush=True)
            if self.plan.devices_used < self.world:  # say why some processes get no work
                why = self.plan.predicted.get("idle_reason") or "the plan file leaves them idle"
                print(f"rannc: {self.world - self.plan.devices_used} process(es) idle: {why}", file=sys.stderr,
                      flush=True)
        assignment = [i for i, st in enumerate(self.plan.stages) for _ in range(st.start, st.end)]
        stages = build_stages(bg, assignment)
        holders: dict[int, set[int]] = {}
        objects: dict[int, torch.Tensor] = {}
        for st in stages:
            for t in [*st.graph_module.parameters(), *st.graph_module.buffers()]:
                holders.setdefault(id(t), set()).update(self.layout.stage_ranks[st.index])
                objects[id(t)] = t
        self.holders = {k: tuple(sorted(v)) for k, v in holders.items()}
        groups = self.groups = make_groups([r for r in self.holders.values()] +
                                           [tuple(r) for r in self.layout.stage_ranks], self.timeout)
        role = self.layout.role(self.rank)
        local_ids = {k for k, v in self.holders.items() if self.rank in v}
        seen: set[int] = set()
        fresh: set[int] = set()
        self.local = []
        for p in self.model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in local_ids:
                self.local.append(p)
                if id(p) in self.deferred:
                    fresh.add(id(p))
                if p.device != self.device:
                    p.data = p.data.to(self.device)
            elif id(p) in self.holders:  # another rank's stage holds it
                self.freed[id(p)] = (p, p.shape)
                p.data = torch.empty(0, dtype=p.dtype)
                p.grad = None
        if fresh:
            from rannc_cli.runtime.deferred import reset_modules

            missing = reset_modules(self.model, fresh, self.rng_base)
            if missing and self.resume_from is None:
                print(f"rannc: rank {self.rank}: modules without reset_parameters() keep uninitialised parameters "
                      f"until a checkpoint is loaded: {', '.join(missing[:5])}", file=sys.stderr, flush=True)
        for b in self.model.buffers():
            if id(b) in local_ids and b.device != self.device:
                b.data = b.data.to(self.device)
        by_ranks: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for p in self.local:
            if p.requires_grad:
                by_ranks.setdefault(self.holders[id(p)], []).append(p)
        if self.plan.allreduce_overlap:
            from rannc_cli.config import settings
            from rannc_cli.runtime.allreduce import OverlapReducer

            bucket = int(float(settings.get("allreduce_bucket_mb")) * (1 << 20))
            self.reducer = OverlapReducer(by_ranks, groups, self.rank, list(self.model.parameters()), bucket)
        else:
            self.reducer = GradReducer(by_ranks, groups, self.rank)
        if self.optimizer is not None:
            from rannc_cli.runtime.checkpoint import trim_optimizer

            if self.plan.zero:
                from rannc_cli.runtime.zero import ZeroSharding

                self.zero = ZeroSharding(self, self.optimizer)  # before trimming: its state dicts build on ZeRO's
            trim_optimizer(self, self.optimizer)
            if not self.local:
                # A rank without a stage steps an empty placeholder, so that GradScaler.step (which
                # insists on at least one gradient) behaves as on every other rank.
                self.placeholder = nn.Parameter(torch.zeros(0, device=self.device))
                self.optimizer.param_groups[0]["params"].append(self.placeholder)
        del role, objects
        if self.optimizer is not None:
            self._wrap_optimizer_step(self.optimizer)
        if self.resume_from is not None:
            from rannc_cli.runtime.checkpoint import load_shards

            load_shards(self, self.resume_from)
        elif auto is not None:
            from rannc_cli.runtime.checkpoint import load_gathered, load_shards, plan_key

            folder, manifest = auto
            exact = manifest["world_size"] == self.world and manifest["plan_key"] == plan_key(self.plan)
            (load_shards if exact else load_gathered)(self, folder)
            self.replay_until = self.step
            if self.rank == 0:
                how = "same plan, exact shards" if exact else \
                    f"saved by {manifest['world_size']} process(es) with another plan, state gathered into this plan"
                print(f"rannc: resumed at step {self.step} from {folder} ({how}); the first {self.step} training "
                      "step(s) of the script replay without training", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ preemption
    def _wrap_optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        """optimizer.step(): a no-op for replayed steps; after it, the agreed preemption checkpoint."""
        import functools
        import types

        base = opt.step
        engine = self

        # A bound method that keeps the marks of an LR scheduler that wrapped the step before (no
        # "optimizer.step() has been overridden" warning) and that a later scheduler can wrap again.
        @functools.wraps(base)
        def step(_opt: Any, *a: Any, **kw: Any) -> Any:
            if engine.in_replay:
                return None
            out = engine.zero.step(base, a, kw) if engine.zero is not None else base(*a, **kw)
            if engine.stop_agreed:
                engine.checkpoint_and_exit()
            return out

        opt.step = types.MethodType(step, opt)  # type: ignore[method-assign]

    def checkpoint_and_exit(self) -> None:
        """Every rank: write the preemption checkpoint, then leave with exit code 0 (SystemExit)."""
        from rannc_cli.runtime.preempt import write_checkpoint

        assert self.ckpt_root is not None
        folder = write_checkpoint(self, self.ckpt_root)
        print(f"rannc: rank {self.rank} checkpointed at step {self.step} in {folder}; exiting for requeue",
              file=sys.stderr, flush=True)
        try:
            dist.destroy_process_group()
        finally:
            sys.exit(0)

    # ------------------------------------------------------------------ one step
    def forward(self, args: tuple, kwargs: dict) -> torch.Tensor:
        try:
            return self._forward(args, kwargs)
        except RanncError:
            raise
        except Exception as exc:
            if _is_comm_error(exc):
                import time

                time.sleep(1.0)  # let the rank that failed first report before this one does
                raise PeerLost(f"rank {self.rank} lost contact with the other ranks during a step "
                               f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})",
                               hint="another rank most likely failed; its error is the one to read", cause=exc) from None
            raise

    def _forward(self, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.local_batches and torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves((args, kwargs))):
            raise RanncError("an input requires grad, which local_batches=True does not support (each rank's share "
                             "is gathered as data)", hint="pass the global batch on every rank, or detach the input")
        args, kwargs = self._batch(args, kwargs)
        if not self._checked_inputs:
            if not self.local_batches:
                self._check_same_batch(args, kwargs)
            self._checked_inputs = True
        mode = self._mode(args, kwargs)
        captured = mode.bg.captured
        train = torch.is_grad_enabled()
        if train and self.stop_agreed and self.optimizer is None:
            self.checkpoint_and_exit()  # no optimizer to wait for: the previous step is complete
        if train:
            self.in_replay = False
        if train and self.replayed < self.replay_until:
            return self._replay(captured, args, kwargs)
        values = captured.flatten_inputs(args, kwargs)
        sizes = {v.shape[i.batch_dim] for i in captured.inputs if i.is_tensor and i.batch_dim is not None
                 for v in [values[i.placeholder]]}
        if len(sizes) != 1:
            raise RanncError(f"the batch's tensors disagree on the batch size ({sorted(sizes)})",
                             hint="give every batch input the same first dimension")
        batch_size = sizes.pop()
        out_device = next((t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)),
                          self.device)
        loss_dtype = captured.node(captured.loss_node).meta["val"].dtype
        stash: dict[nn.Parameter, torch.Tensor | None] = {}
        if train:
            for p in self.local:
                stash[p], p.grad = p.grad, None
        seed = self.seed_scale
        assert self.reducer is not None
        wanted = [i.placeholder for i in captured.inputs if train and i.is_tensor
                  and values[i.placeholder].requires_grad]  # the same on every rank: the same batch
        mode.executor.input_grads = {name: torch.zeros_like(values[name], device=self.device) for name in wanted}
        try:
            if train:  # this rank's stage modules: an OverlapReducer counts their gradient accumulations
                self.reducer.arm([mode.stages[s] for s in mode.executor.my_stages], self.plan.microbatches)
            local = mode.executor.run(values, batch_size, train, seed, self.step)
            if train:
                self.reducer.start()
                self.reducer.finish()
                for g in mode.executor.input_grads.values():
                    dist.all_reduce(g)  # each rank added the slices its stage read
            flag = 0.0
            if train and self.scaled:
                flag = float(any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self.local))
            stop = float(self.watch is not None and self.watch.requested)
            total = torch.tensor([float(local), flag, stop], dtype=torch.float64, device=self.device)
            dist.all_reduce(total)
            if total[2].item() > 0 and not self.stop_agreed:
                self.stop_agreed = True
                if self.rank == 0:
                    print(f"rannc: preemption requested; checkpointing after step {self.step + int(train)}",
                          file=sys.stderr, flush=True)
            pending: dict[nn.Parameter, torch.Tensor | None] = {}
            if train:
                nonfinite = bool(total[1].item() > 0)
                for p in self.local:
                    g = p.grad
                    if nonfinite and g is not None:
                        g.fill_(float("nan"))  # every rank skips the step, as one GradScaler would
                    pending[p] = g
                if self.placeholder is not None:
                    pending[self.placeholder] = torch.zeros(0, device=self.device)
        finally:
            if train:
                for p, g in stash.items():
                    p.grad = g
        loss = total[0].to(dtype=loss_dtype, device=out_device)
        if not train:
            return loss
        self.step += 1
        self.losses.append(float(total[0]))
        input_grads = [mode.executor.input_grads.pop(name) for name in wanted]
        return _PipelineLoss.apply(self.anchor, loss, self, pending, seed, input_grads,
                                   *[values[name] for name in wanted])

    def _replay(self, captured: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        """A training step the checkpoint already contains: its recorded loss, no gradients, no update."""
        value = self.losses[self.replayed] if self.replayed < len(self.losses) else float("nan")
        self.replayed += 1
        self.in_replay = True
        out_device = next((t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)),
                          self.device)
        loss = torch.tensor(value, dtype=captured.node(captured.loss_node).meta["val"].dtype, device=out_device)
        pending: dict[nn.Parameter, torch.Tensor | None] = {}
        if self.scaled:  # GradScaler.step needs gradients to inspect; zeros are finite, as the real ones were
            pending = {p: torch.zeros_like(p) for p in self.local if p.requires_grad}
            if self.placeholder is not None:
                pending[self.placeholder] = torch.zeros(0, device=self.device)
        return _PipelineLoss.apply(self.anchor, loss, self, pending, self.seed_scale, [])

    def apply_grads(self, pending: dict[nn.Parameter, torch.Tensor | None], grad_output: float, seed: float) -> None:
        """``loss.backward()``: add grad_output / seed times this step's gradients to ``.grad``."""
        factor = grad_output / seed
        for p, g in pending.items():
            if g is None:
                continue
            if factor != 1.0:
                g = g * factor
            p.grad = g if p.grad is None else p.grad + g
        if grad_output != 1.0:
            self.scaled = True
        if grad_output != 0.0 and grad_output == grad_output and abs(grad_output) != float("inf"):
            self.seed_scale = grad_output
