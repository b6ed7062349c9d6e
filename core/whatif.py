"""What if the seller acted: an order's risk after each action the seller can take.

The reasons (:mod:`core.explain`) say which causes raise an order's risk; the what-if answer turns
the seller's possible actions into probabilities, one per action that fits the order, in the
order of :data:`core.playbook.WHAT_IF_ACTIONS`:

- ``refund_difference`` fixes the cause ``price_drop``: the price as paid, no price change or
  promotion since the purchase. Its ``amount`` is what the buyer would get back, the paid value
  times today's price drop (``order_value_rub × max(0, −price_change_pct) / 100``) in the
  posting's currency (:data:`core.features.RUB_PER_UNIT`), None when the value, the price or
  the currency is unknown.
- ``restore_card`` fixes ``listing_changed``: the card as it was at the purchase.
- ``expedite`` before the handover fixes ``not_shipped`` (ship today); after it, every one of
  ``tracking_quiet`` and ``late_delivery`` that applies to the order, together on one variant:
  tracking that keeps moving and a promise that is kept.
- ``switch_carrier`` fixes ``slow_carrier``: the shop's usual carrier (its name is the model's
  ``metadata["reference_values"]["carrier"]``) with its record and promise.
- ``confirm_with_buyer`` and, before the handover only, ``hold_and_confirm``.

The first four are **counterfactual** (``basis``): the order's features with the causes fixed by
the very rules the reasons use (:data:`core.counterfactuals.CAUSE_RULES`), scored by the model,
and the calibrated probability moved by the booster's change in log-odds
(:func:`core.counterfactuals.shift_log_odds`), so an action's drop is the drop of the reason it
fixes. Such an action is offered only where one of its causes applies. All variants of all
orders go through the booster in one call. The model may find that a fix raises an order's risk
(a negative ``risk_drop``): that is reported as it is.

The last two change no feature the model reads (a conversation with the buyer leaves no trace in
the order's data), so the model cannot score them. Their probability is the **assumed effect**
the decisions are priced with (:class:`core.costs.CostsConfig`): ``p · (1 − contact_effect)``
and ``p · (1 − hold_effect)``, the share of would-be cancellations the intervention is taken to
prevent, and not something the model learned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from core.counterfactuals import CAUSE_RULES, NamedMatrix, reference_codes, score_variants
from core.explain import model_costs
from core.features.schema import RUB_PER_UNIT
from core.playbook import LANGUAGES, WHAT_IF_ACTIONS, Playbook, load_playbook

if TYPE_CHECKING:
    from core.costs import CostsConfig
    from core.model import RiskModel

Basis = Literal["counterfactual", "assumed_effect"]
COUNTERFACTUAL: Basis = "counterfactual"
ASSUMED_EFFECT: Basis = "assumed_effect"

# Money is shown with its sign where the sign is unambiguous, else with its ISO code.
CURRENCY_SIGNS = {"CNY": "¥", "RUB": "₽"}
UNKNOWN = "?"


@dataclass(frozen=True)
class WhatIf:
    """One action for one order: its title and the order's risk before and after it."""

    action: str
    title: str  # in the requested language
    basis: Basis
    probability_before: float
    probability_after: float
    risk_level_after: str
    risk_drop: float  # probability_before − probability_after
    amount: float | None  # the refund, in ``currency``; None for the other actions
    currency: str | None  # ISO code of ``amount``


@dataclass(frozen=True)
class CounterfactualAction:
    """An action that fixes causes: the ones it fixes before the handover, and after it."""

    code: str
    before_handover: tuple[str, ...]
    after_handover: tuple[str, ...]

    def causes(self, handed_over: np.ndarray) -> dict[str, np.ndarray]:
        """Per cause the action may fix, the rows where it is the action's to fix."""
        return {
            code: np.where(handed_over, code in self.after_handover, code in self.before_handover)
            for code in dict.fromkeys(self.before_handover + self.after_handover)
        }


COUNTERFACTUAL_ACTIONS = (
    CounterfactualAction("refund_difference", ("price_drop",), ("price_drop",)),
    CounterfactualAction("restore_card", ("listing_changed",), ("listing_changed",)),
    CounterfactualAction("expedite", ("not_shipped",), ("tracking_quiet", "late_delivery")),
    CounterfactualAction("switch_carrier", ("slow_carrier",), ("slow_carrier",)),
)
ASSUMED_EFFECT_ACTIONS = ("confirm_with_buyer", "hold_and_confirm")


def handed_over_rows(handed_over: np.ndarray) -> np.ndarray:
    """Whether each order is handed over; unknown counts as not yet, as the decisions take it."""
    return np.nan_to_num(np.asarray(handed_over, dtype="float64"), nan=0.0) > 0.5


def build_counterfactual_probabilities(
    model: RiskModel,
    matrix: np.ndarray,
    raw: np.ndarray,
    probabilities: np.ndarray,
    handed_over: np.ndarray,
    reference: Mapping[str, float] | None = None,
) -> np.ndarray:
    """Calibrated probability of each order after each :data:`COUNTERFACTUAL_ACTIONS` action:
    rows x actions, NaN where none of the action's causes applies.

    ``matrix``, ``raw`` and ``probabilities`` as :func:`core.counterfactuals.risk_drop_matrix`
    takes them; ``handed_over`` per row (see :func:`handed_over_rows`).
    """
    reference = reference_codes(model) if reference is None else reference
    probabilities = np.asarray(probabilities, dtype="float64")
    positions = {c: i for i, c in enumerate(model.feature_columns)}
    base = NamedMatrix(matrix, positions)
    handed = handed_over_rows(handed_over)
    rules = {rule.code: rule for rule in CAUSE_RULES}
    applies: dict[str, np.ndarray] = {}
    blocks, owners = [], []
    for column, action in enumerate(COUNTERFACTUAL_ACTIONS):
        fixes = {}
        for code, its_to_fix in action.causes(handed).items():
            if code not in applies:
                applies[code] = rules[code].applies(base, reference)
            fixes[code] = its_to_fix & applies[code]
        rows = np.flatnonzero(np.logical_or.reduce(list(fixes.values())))
        if rows.size == 0:
            continue
        variant = matrix[rows].copy()
        for code, fixed in fixes.items():
            chosen = np.flatnonzero(fixed[rows])
            if chosen.size:
                part = NamedMatrix(variant[chosen], positions)
                rules[code].fix(part, reference)
                variant[chosen] = part.values
        blocks.append(variant)
        owners.append((column, rows))
    return score_variants(model, blocks, owners, raw, probabilities, len(COUNTERFACTUAL_ACTIONS))


def build_refund_amounts(
    order_values_rub: np.ndarray,
    price_change_pct: np.ndarray,
    currencies: Sequence[str | None],
) -> list[float | None]:
    """The price difference today of each order, in its currency, to the cent (None: unknown).

    ``order_value_rub × max(0, −price_change_pct) / 100`` converted back with the same fixed
    rates the feature was converted with; a currency without a rate is unknown.
    """
    rates = np.array(
        [RUB_PER_UNIT.get(c, np.nan) if isinstance(c, str) else np.nan for c in currencies],
        dtype="float64",
    )
    dropped = np.maximum(0.0, -np.asarray(price_change_pct, dtype="float64"))  # NaN stays NaN
    amounts = np.asarray(order_values_rub, dtype="float64") * dropped / 100.0 / rates
    return [round(a, 2) + 0.0 if math.isfinite(a) else None for a in amounts.tolist()]


def format_money(amount: float, currency: str) -> str:
    """``¥40.00``, ``₽1,200.00``; a currency without a sign after the number: ``40.00 USD``."""
    sign = CURRENCY_SIGNS.get(currency)
    return f"{sign}{amount:,.2f}" if sign else f"{amount:,.2f} {currency}"


def build_what_ifs(
    model: RiskModel,
    matrix: np.ndarray,
    raw: np.ndarray,
    probabilities: np.ndarray,
    handed_over: np.ndarray,
    order_values_rub: np.ndarray,
    price_change_pct: np.ndarray,
    currencies: Sequence[str | None],
    lang: str | Sequence[str] = "en",
    *,
    playbook: Playbook | None = None,
    costs: CostsConfig | None = None,
    reference: Mapping[str, float] | None = None,
) -> list[list[WhatIf]]:
    """Per order, the actions that fit it, in :data:`WHAT_IF_ACTIONS` order.

    ``matrix``, ``raw`` and ``probabilities`` are the orders' model matrix, the booster's raw
    output and the calibrated probabilities (what scoring computed); ``handed_over``,
    ``order_values_rub`` and ``price_change_pct`` their feature values, ``currencies`` their
    posting currencies (ISO codes, None: unknown). ``lang``: one language, or one per order.
    ``costs`` (the assumed effects) default to the model's, ``reference`` to its
    :func:`core.counterfactuals.reference_codes`.
    """
    n = len(matrix)
    langs = [lang] * n if isinstance(lang, str) else list(lang)
    if len(langs) != n:
        raise ValueError(f"{len(langs)} languages for {n} orders")
    for chosen in set(langs):
        if chosen not in LANGUAGES:
            raise ValueError(f"lang must be one of {LANGUAGES}, not {chosen!r}")
    playbook = playbook or load_playbook()
    costs = costs or model_costs(model)
    p = np.asarray(probabilities, dtype="float64")
    handed = handed_over_rows(handed_over)

    after = np.full((n, len(WHAT_IF_ACTIONS)), np.nan)
    counterfactual = [WHAT_IF_ACTIONS.index(a.code) for a in COUNTERFACTUAL_ACTIONS]
    after[:, counterfactual] = build_counterfactual_probabilities(
        model, matrix, raw, p, handed, reference
    )
    after[:, WHAT_IF_ACTIONS.index("confirm_with_buyer")] = p * (1.0 - costs.contact_effect)
    after[:, WHAT_IF_ACTIONS.index("hold_and_confirm")] = np.where(
        handed, np.nan, p * (1.0 - costs.hold_effect)
    )
    rows, columns = np.nonzero(~np.isnan(after))
    levels = model.risk_levels(after[rows, columns])

    refund = WHAT_IF_ACTIONS.index("refund_difference")
    amounts = build_refund_amounts(order_values_rub, price_change_pct, currencies)
    carrier = (model.metadata.get("reference_values") or {}).get("carrier")
    carrier = None if carrier is None else str(carrier)
    counterfactual_columns = set(counterfactual)
    what_ifs: list[list[WhatIf]] = [[] for _ in range(n)]
    for row, column, level in zip(rows.tolist(), columns.tolist(), levels.tolist(), strict=True):
        action = WHAT_IF_ACTIONS[column]
        amount = amounts[row] if column == refund else None
        currency = currencies[row] if amount is not None else None
        before, probability = float(p[row]), float(after[row, column])
        what_ifs[row].append(
            WhatIf(
                action=action,
                title=_title(
                    playbook, action, langs[row], bool(handed[row]), amount, currency, carrier
                ),
                basis=COUNTERFACTUAL if column in counterfactual_columns else ASSUMED_EFFECT,
                probability_before=before,
                probability_after=probability,
                risk_level_after=str(level),
                risk_drop=before - probability,
                amount=amount,
                currency=currency,
            )
        )
    return what_ifs


def _title(
    playbook: Playbook,
    action: str,
    lang: str,
    handed_over: bool,
    amount: float | None,
    currency: str | None,
    carrier: str | None,
) -> str:
    """The action's title for one order. A refund of nothing today (the price is back, only
    the lowest price or a promotion since the purchase was lower) is titled without its amount,
    as an unknown one is."""
    money = None
    if amount is not None and amount > 0 and currency is not None:
        money = format_money(amount, currency)
    texts = playbook.what_if_entry(action).texts(
        handed_over=handed_over, amount_known=money is not None, carrier_known=carrier is not None
    )
    values = {
        "amount": money or UNKNOWN,
        "currency_sign": CURRENCY_SIGNS.get(currency, currency) if currency else UNKNOWN,
        "carrier": carrier or UNKNOWN,
    }
    return texts.get(lang).format_map(values)
