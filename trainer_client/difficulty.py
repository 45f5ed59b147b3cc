"""How hard the examples a selection round picked are, from the losses of the round's own embedding pass.

The CREST paper (section 5) reports that deep models benefit from subsets of increasing difficulty. The
loader measures it per round without extra forward passes: the no-grad pass that embeds a round's ids also
gives each id's cross-entropy, and the coresets the service returns are a subset of those ids. As every loss
falls during training, compare the selected examples with the round's own ids (``selected_loss`` against
``embedded_loss``, or ``selected_percentile``), not across rounds. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RoundDifficulty:
    """One round's selection against its candidates. Losses are cross-entropies in nats, in eval mode, with the
    model of the step the round was embedded at."""

    round: int  # the loader's round counter
    step: int  # trainer step at which the round's ids were embedded (the model the losses come from)
    start_step: int  # trainer step at which training switched to the round's coresets
    embedded: int  # ids embedded: the round's random subsets (plus any excluded ids the service re-tests)
    selected: int  # ids in the coresets training uses
    embedded_loss: float  # mean loss of the embedded ids: what a random pick from them would average
    selected_loss: float  # mean loss of the selected ids, unweighted: their difficulty
    selected_loss_weighted: float  # the same weighted by coreset weights: what the weighted training loss sees
    # Mean rank of the selected ids' losses among the embedded ids, in [0, 1]: 0.5 is no bias, above 0.5 the
    # coresets lean to the harder examples of the round.
    selected_percentile: float

    def __str__(self) -> str:
        return (
            f"selected loss {self.selected_loss:.3f} (weighted {self.selected_loss_weighted:.3f}) against "
            f"{self.embedded_loss:.3f} for the round's ids; percentile {self.selected_percentile:.2f}"
        )


def round_difficulty(
    round: int,
    step: int,
    start_step: int,
    ids: np.ndarray,
    losses: np.ndarray,
    selected_ids: np.ndarray,
    weights: np.ndarray,
) -> RoundDifficulty:
    """Compare the selected ids with all the round's ids.

    Args:
        ids: int64 (n,) the embedded ids, sorted ascending and unique (the service's round plan).
        losses: float32 (n,) their losses, in the order of ``ids``.
        selected_ids: int64 (m,) the coresets' ids, each one of ``ids``.
        weights: float32 (m,) their coreset weights.
    """
    ids, losses = np.asarray(ids, dtype=np.int64), np.asarray(losses, dtype=np.float64)
    selected_ids, weights = np.asarray(selected_ids, dtype=np.int64), np.asarray(weights, dtype=np.float64)
    if ids.shape != losses.shape or selected_ids.shape != weights.shape:
        raise ValueError(
            f"ids/losses have shapes {ids.shape}/{losses.shape} and selected ids/weights "
            f"{selected_ids.shape}/{weights.shape}; each pair must match"
        )
    if len(ids) == 0 or len(selected_ids) == 0:
        raise ValueError(f"a round needs embedded and selected ids, received {len(ids)} and {len(selected_ids)}")
    pos = np.searchsorted(ids, selected_ids)
    if (pos >= len(ids)).any() or (ids[np.minimum(pos, len(ids) - 1)] != selected_ids).any():
        raise ValueError("selected ids must all be among the round's embedded ids (sorted ascending)")
    # Rank of every loss among the round's, ties at their mean rank, scaled to [0, 1].
    sorted_losses = np.sort(losses)
    lo = np.searchsorted(sorted_losses, losses, side="left")
    hi = np.searchsorted(sorted_losses, losses, side="right")
    rank = (lo + hi - 1) / 2.0
    scale = max(len(losses) - 1, 1)
    chosen = losses[pos]
    return RoundDifficulty(
        round=round,
        step=step,
        start_step=start_step,
        embedded=len(ids),
        selected=len(selected_ids),
        embedded_loss=float(losses.mean()),
        selected_loss=float(chosen.mean()),
        selected_loss_weighted=float((chosen * weights).sum() / weights.sum()),
        selected_percentile=float((rank[pos] / scale).mean()),
    )
