"""CREST region control: a quadratic model of the coreset loss, and the check that ends a region.

After each selection (crest-algorithm.md section 3.3) the controller fits, on the new weighted coreset pool,

    L(w_sel + δ) ≈ L0 + δ·g0 + ½ δᵀ diag(h) δ

with g0 the plain coreset gradient at w_sel and h a Hutchinson estimate of the Hessian diagonal. δ is read
from the parameters themselves (δ = w - w_sel), so it is exactly the sum of the optimizer's real updates, with
momentum, weight decay and the real learning rate included, and the training step keeps its one backward pass
(the released code's second backward doubled every gradient: section 5.1). Every ``interval`` steps the
loader measures the true mean loss on the union of the round's random subsets (a forward pass on those ids
only, never the whole dataset: section 5.4) and the controller asks for a new selection when
|true - predicted| > τ·true (section 3.4). After each non-first fit the interval adapts to curvature,
interval = ceil(c_first / c_now · interval_mul), and the coresets per round to P = min(5·interval, cap).

Pure torch: no gRPC, no service. ``mode="fixed"`` keeps the skeleton's rule (a region lasts a fixed number of
steps) for comparisons.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch

log = logging.getLogger(__name__)

STATE_VERSION = 1
Mode = Literal["crest", "fixed"]
MODES: tuple[str, ...] = get_args(Mode)
Curvature = Literal["rms", "raw"]
CURVATURES: tuple[str, ...] = get_args(Curvature)


@dataclass(frozen=True, kw_only=True)
class RegionConfig:
    """How regions end and how the quadratic model is built."""

    # The region rule: "crest", the Taylor check decides when to reselect; "fixed", every region lasts
    # steps_per_round steps.
    mode: Mode = "crest"
    # τ, the relative error |true - predicted| / true above which a region ends (CREST check_thresh_factor).
    tau: float = 0.1
    # Steps between checks until the second fit adapts it (CREST starts at 1: a check every step).
    initial_interval: int = 1
    # Scales the curvature-ratio interval (CREST interval_mul).
    interval_mul: float = 1.0
    # Largest adapted interval; 0 means unbounded as in CREST (flat curvature could stop checking for long).
    max_interval: int = 0
    # Coresets per round per step of interval in "crest" mode (CREST batch_num_mul): P = min(this * interval,
    # max_coresets). A fixed region takes all max_coresets.
    coresets_per_interval: int = 5
    # Region length in "fixed" mode, in optimizer steps from one switch to the next (the loader asks for the next
    # round its lookahead before the end).
    steps_per_round: int = 50
    # Rademacher probes per coreset batch for the Hessian diagonal (one double backward each).
    hutchinson_probes: int = 1
    # Estimate the Hessian diagonal on every this-many-th fit only; the fits in between take the coreset gradient
    # alone (one plain backward per batch, no double backward) and keep the curvature of the last estimate, and so
    # the interval and P it gave. 1 estimates at every fit (CREST). With the "rms" curvature each estimate moves
    # CREST's EMA (beta 0.999) by about a thousandth, so skipping most of them changes h little and the fit's cost
    # most (with 5 on Fashion-MNIST: -60% of the fit's time, the double backward being about 3/4 of a fit).
    hessian_every: int = 1
    # "rms": CREST's default (approx_moment), sqrt of an EMA of the squared Hutchinson diagonal plus 1e-4,
    # always positive; "raw": the plain Hutchinson mean, unbiased (the exact diagonal for diagonal Hessians).
    curvature: Curvature = "rms"
    # EMA factor of the "rms" curvature (AdaHessian's beta2); its state persists across fits as in CREST.
    rms_beta: float = 0.999
    # Seeds the Rademacher probes.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, received {self.mode!r}")
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, received {self.curvature!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, received {self.tau}")
        for name in (
            "initial_interval",
            "coresets_per_interval",
            "steps_per_round",
            "hutchinson_probes",
            "hessian_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, received {getattr(self, name)}")


class Decision(enum.IntEnum):
    """What the loader does after a step: NONE -> keep training; CHECK -> measure the true loss on the
    random subsets and call ``check``; RESELECT -> request a new round (fixed mode only; in crest mode a
    reselection comes out of ``check``)."""

    NONE = 0
    CHECK = 1
    RESELECT = 2


@dataclass(frozen=True)
class QuadraticFit:
    """One fit of the quadratic model."""

    step: int
    loss0: float  # L0, weighted mean loss of the coreset pool at w_sel
    grad_norm: float  # ||g0||
    curvature_norm: float  # mean over coreset batches of ||h_b||
    examples: int
    interval: int  # check interval adopted after this fit
    num_coresets: int  # P for the next round


@dataclass(frozen=True)
class CheckResult:
    """One Taylor check."""

    step: int
    true_loss: float  # mean cross-entropy on the union of the random subsets
    predicted: float  # L0 + δ·g0 + ½ δᵀ diag(h) δ
    relative_error: float  # |true - predicted| / true
    reselect: bool


@dataclass
class RegionStats:
    """Counters of the controller's decisions (each one is also logged)."""

    fits: int = 0
    checks: int = 0
    reselections: int = 0
    last_interval: int = 1
    last_num_coresets: int = 0
    last_relative_error: float = float("nan")


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """float32 (sum of numel,): the tensors flattened and concatenated on the first one's device (a model spread
    over several devices, e.g. ``device_map="auto"``, has its parameters on each)."""
    parts = list(tensors)
    home = parts[0].device if parts else torch.device("cpu")
    return torch.cat([t.reshape(-1).to(home, torch.float32) for t in parts])


class RegionController:
    """Decides when a CREST region ends.

    Args:
        config: the region settings.
        max_coresets: cap on P (the service session's number of random subsets per round); a fixed region takes
            all of them.
        lead_steps: in "fixed" mode, ask for the next round this many steps before the region's end (the loader's
            lookahead): ``after_step`` says RESELECT at step max(1, steps_per_round - lead_steps) of a region.
    """

    def __init__(self, config: RegionConfig | None = None, *, max_coresets: int = 5, lead_steps: int = 0) -> None:
        self.config = config or RegionConfig()
        self.max_coresets = max_coresets
        self.reselect_at = max(1, self.config.steps_per_round - lead_steps)
        self.stats = RegionStats(last_interval=self.config.initial_interval)
        self.interval = self.config.initial_interval
        self.num_coresets = (
            max_coresets if self.config.mode == "fixed" else min(self.config.coresets_per_interval, max_coresets)
        )
        self.steps_since_fit = 0
        self._generator = torch.Generator().manual_seed(self.config.seed)
        self._w_sel: torch.Tensor | None = None  # float32 (num_params,) parameters at the last fit
        self._g0: torch.Tensor | None = None  # float32 (num_params,)
        self._h0: torch.Tensor | None = None  # float32 (num_params,)
        self._loss0 = float("nan")
        self._first_curvature: float | None = None
        self._rms_sq: torch.Tensor | None = None  # EMA of hdiag², "rms" curvature only
        self._rms_count = 0
        self._curvature = float("nan")  # mean ||h_b|| of the last Hessian estimate (kept by fits without one)

    # -- the quadratic model ------------------------------------------------------------------------------

    def hutchinson_diagonal(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Gradient and Hutchinson Hessian diagonal of ``loss`` (which must carry a graph).

        Returns (g, hdiag), float32 (num_params,) on the first parameter's device: hdiag = mean over probes of
        v ⊙ Hv with v Rademacher. The probes are drawn on the CPU from the seeded generator, so a seed gives the
        same probes on every device. Uses ``torch.autograd.grad``, so ``p.grad`` is never touched.
        """
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hdiag: torch.Tensor | None = None
        for k in range(self.config.hutchinson_probes):
            vs = [torch.randint(0, 2, p.shape, generator=self._generator).to(p) * 2 - 1 for p in params]
            last = k == self.config.hutchinson_probes - 1
            hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=not last)
            vhv = _flat(v * hv for v, hv in zip(vs, hvs, strict=True)).detach()
            hdiag = vhv if hdiag is None else hdiag + vhv
        assert hdiag is not None
        return _flat(g.detach() for g in grads), hdiag / self.config.hutchinson_probes

    def start_region(self) -> None:
        """Begin a region without a quadratic model: in fixed mode only the step count decides."""
        self.steps_since_fit = 0

    def fit(
        self, params: Sequence[torch.Tensor], batches: Iterable[tuple[torch.Tensor, int]], step: int
    ) -> QuadraticFit:
        """Fit the quadratic model at the current parameters on a coreset pool.

        Args:
            params: the trained parameters (``requires_grad``), in a fixed order.
            batches: (weighted mean loss with graph, number of examples) per coreset batch, produced lazily.
            step: the trainer step, for logs.
        """
        params = list(params)
        self._to(params[0].device)
        # Between Hessian estimates (hessian_every) a fit takes the gradient alone and keeps the last curvature.
        estimate = self._h0 is None or self.stats.fits % self.config.hessian_every == 0
        # Summed on the parameters' device and read once at the end: no host sync per batch.
        n_total, loss_sum = 0, torch.zeros((), dtype=torch.float64)
        g_sum = h_sum = torch.zeros(0)
        curv_norms: list[torch.Tensor] = []
        for loss, n in batches:
            if estimate:
                g, hdiag = self.hutchinson_diagonal(loss, params)
                if self.config.curvature == "rms":
                    beta = self.config.rms_beta
                    prev = self._rms_sq * beta if self._rms_sq is not None else 0.0
                    self._rms_sq = hdiag**2 * (1 - beta) + prev
                    self._rms_count += 1
                    h = torch.sqrt(self._rms_sq / (1 - beta**self._rms_count)) + 1e-4
                else:
                    h = hdiag
                h_sum = h_sum + n * h if n_total else n * h
                curv_norms.append(h.norm())
            else:
                g = _flat(torch.autograd.grad(loss, params))
            g_sum = g_sum + n * g if n_total else n * g
            loss_sum = loss_sum.to(loss.device) + n * loss.detach().double()
            n_total += n
        if n_total == 0:
            raise ValueError("fit received no coreset batches; a region needs at least one example")
        if estimate:
            self._h0 = h_sum / n_total
            self._curvature = curvature = float(torch.stack(curv_norms).double().mean())
            if self._first_curvature is None:
                self._first_curvature = curvature
            else:
                ratio = self._first_curvature / max(curvature, 1e-12) * self.config.interval_mul
                self.interval = max(1, math.ceil(ratio))
                if self.config.max_interval:
                    self.interval = min(self.interval, self.config.max_interval)
                self.num_coresets = min(self.interval * self.config.coresets_per_interval, self.max_coresets)
        self._g0, self._loss0 = g_sum / n_total, float(loss_sum) / n_total
        self._w_sel = _flat(p.detach() for p in params).clone()
        self.steps_since_fit = 0
        self.stats.fits += 1
        self.stats.last_interval, self.stats.last_num_coresets = self.interval, self.num_coresets
        fit = QuadraticFit(
            step, self._loss0, float(self._g0.norm()), self._curvature, n_total, self.interval, self.num_coresets
        )
        log.info(
            "step %d: quadratic model on %d coreset examples: L0 %.4f |g0| %.3g curvature %.3g -> check every %d "
            "steps, %d coresets per round",
            step,
            n_total,
            fit.loss0,
            fit.grad_norm,
            self._curvature,
            self.interval,
            self.num_coresets,
        )
        return fit

    def delta(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """δ = w - w_sel, float32 (num_params,) on the first parameter's device: the sum of every optimizer update
        since the fit."""
        if self._w_sel is None:
            raise RuntimeError("no quadratic model yet: call fit() after a selection")
        w = _flat(p.detach() for p in params)
        self._to(w.device)
        return w - self._w_sel

    def predict(self, params: Sequence[torch.Tensor]) -> float:
        """The quadratic model's loss at the current parameters."""
        d = self.delta(params)
        assert self._g0 is not None and self._h0 is not None
        return self._loss0 + float(d @ self._g0) + 0.5 * float(d @ (self._h0 * d))

    def _to(self, device: torch.device) -> None:
        """Keep the model's vectors where the parameters are (they load on the CPU from a checkpoint)."""
        self._w_sel, self._g0, self._h0, self._rms_sq = (
            None if t is None else t.to(device) for t in (self._w_sel, self._g0, self._h0, self._rms_sq)
        )

    # -- decisions ----------------------------------------------------------------------------------------

    def after_step(self) -> Decision:
        """Count one optimizer step in the current region and say what is due."""
        decision = self.decision_in(1)
        self.steps_since_fit += 1
        return decision

    def decision_in(self, calls: int) -> Decision:
        """What the ``calls``-th ``after_step`` from now will return in this region (no state changes): the loader's
        input pipeline forecasts its batches with it."""
        since = self.steps_since_fit + calls
        if self.config.mode == "fixed":
            return Decision.RESELECT if since == self.reselect_at else Decision.NONE
        if self._w_sel is not None and since % self.interval == 0:
            return Decision.CHECK
        return Decision.NONE

    def check(
        self, params: Sequence[torch.Tensor], true_loss: float, step: int, predicted: float | None = None
    ) -> CheckResult:
        """Compare the true random-subset loss with the prediction; reselect when off by more than τ·true.

        ``predicted`` overrides ``predict(params)``: under DDP the loader passes the mean over ranks, so that
        every rank compares the same two numbers and takes the same decision.
        """
        if predicted is None:
            predicted = self.predict(params)
        rel = abs(true_loss - predicted) / max(abs(true_loss), 1e-12)
        reselect = rel > self.config.tau
        self.stats.checks += 1
        self.stats.reselections += int(reselect)
        self.stats.last_relative_error = rel
        log.info(
            "step %d: check %d steps into the region: true %.4f predicted %.4f error %.1f%% (tau %.0f%%) -> %s",
            step,
            self.steps_since_fit,
            true_loss,
            predicted,
            100 * rel,
            100 * self.config.tau,
            "reselect" if reselect else "keep",
        )
        return CheckResult(step, true_loss, predicted, rel, reselect)

    # -- state ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: region model, intervals, counters, probe RNG (tensors on the CPU)."""

        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.cpu()

        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "interval": self.interval,
            "num_coresets": self.num_coresets,
            "steps_since_fit": self.steps_since_fit,
            "generator": self._generator.get_state(),
            "w_sel": host(self._w_sel),
            "g0": host(self._g0),
            "h0": host(self._h0),
            "loss0": self._loss0,
            "first_curvature": self._first_curvature,
            "rms_sq": host(self._rms_sq),
            "rms_count": self._rms_count,
            "curvature": self._curvature,
            "stats": asdict(self.stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"region controller state has version {version!r}; this code reads version {STATE_VERSION}"
            )
        if state["config"]["mode"] != self.config.mode:
            raise ValueError(
                f"region state was saved in mode {state['config']['mode']!r}, this controller runs {self.config.mode!r}"
            )
        self.interval, self.num_coresets = int(state["interval"]), int(state["num_coresets"])
        self.steps_since_fit = int(state["steps_since_fit"])
        self._generator.set_state(state["generator"].cpu())  # a checkpoint loaded with map_location="cuda"
        self._w_sel, self._g0, self._h0 = state["w_sel"], state["g0"], state["h0"]
        self._loss0, self._first_curvature = float(state["loss0"]), state["first_curvature"]
        self._rms_sq, self._rms_count = state["rms_sq"], int(state["rms_count"])
        self._curvature = float(state.get("curvature", float("nan")))  # absent before hessian_every
        self.stats = RegionStats(**state["stats"])
