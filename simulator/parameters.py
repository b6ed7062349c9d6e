"""What the simulated world is made of, and the rates it runs at.

The carriers, regions and payment types a posting draws, the codes of a posting's outcome and its
transit milestones, the hazards and effect sizes of every mechanism (:class:`Dynamics`) and one
simulation run's configuration (:class:`SimulationConfig`). The step function that applies them
is :mod:`simulator.world`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

# Posting outcome codes.
OPEN, DELIVERED, BUYER_CANCELLED, SELLER_CANCELLED, OZON_CANCELLED, DELIVERY_CANCELLED = range(6)
OUTCOME_NAMES = {
    OPEN: "open",
    DELIVERED: "delivered",
    BUYER_CANCELLED: "buyer_cancelled",
    SELLER_CANCELLED: "seller_cancelled",
    OZON_CANCELLED: "ozon_cancelled",
    DELIVERY_CANCELLED: "delivery_cancelled",
}

# Transit milestones a posting reports as TYPE_STATE_CHANGED pushes, by progress reached.
MILESTONES = (
    (0.0, "posting_transferring_to_delivery"),
    (0.15, "posting_in_carriage"),
    (0.8, "posting_on_way_to_city"),
    (1.0, "posting_in_pickup_point"),
)


@dataclass(frozen=True)
class Carrier:
    tpl_provider_id: int
    name: str
    transit_days: float  # mean door-to-pickup-point transit when tracking is healthy
    scan_every_hours: float  # mean gap between scans when tracking is healthy
    quiet_per_day: float  # chance per day of a tracking blackout starting
    quiet_days: float  # mean blackout length
    promise_days: float  # promised transit Ozon shows the buyer
    share: float  # share of orders


@dataclass(frozen=True)
class Region:
    name: str
    city: str
    extra_days: float  # added to transit and to the promise
    cancel_shift: float  # log-hazard shift of buyers there
    share: float


CARRIERS = (
    Carrier(1001, "Cainiao 菜鸟国际", 10.0, 18.0, 0.10, 3.0, 16.0, 0.30),
    Carrier(1002, "GBS Экспресс", 13.0, 30.0, 0.16, 4.5, 19.0, 0.22),
    Carrier(1003, "Ural Logistics", 8.0, 14.0, 0.05, 2.0, 14.0, 0.18),
    Carrier(1004, "ZTO 中通国际", 15.0, 36.0, 0.22, 5.0, 22.0, 0.15),
    Carrier(24, "Ozon Логистика", 7.0, 10.0, 0.03, 1.5, 12.0, 0.15),
)

REGIONS = (
    Region("Москва", "Москва", 0.0, 0.0, 0.26),
    Region("Санкт-Петербург", "Санкт-Петербург", 1.0, -0.1, 0.12),
    Region("Республика Татарстан", "Казань", 1.5, 0.05, 0.07),
    Region("Свердловская область", "Екатеринбург", 2.0, 0.1, 0.08),
    Region("Новосибирская область", "Новосибирск", 2.5, 0.15, 0.08),
    Region("Краснодарский край", "Краснодар", 2.0, 0.25, 0.09),
    Region("Приморский край", "Владивосток", -1.0, -0.15, 0.06),
    Region("Красноярский край", "Красноярск", 3.0, 0.2, 0.06),
    Region("Ростовская область", "Ростов-на-Дону", 2.0, 0.3, 0.07),
    Region("Республика Саха (Якутия)", "Якутск", 5.0, 0.35, 0.04),
    Region("Калининградская область", "Калининград", 4.0, 0.1, 0.03),
    Region("Омская область", "Омск", 3.0, 0.2, 0.04),
)

REGION_SHIFT = np.array([r.cancel_shift for r in REGIONS])

PAYMENT_TYPES = ("Банковская карта", "Ozon Карта", "СБП", "Оплата при получении")
COD_PAYMENT = 3  # index of payment on delivery


@dataclass(frozen=True)
class Dynamics:
    """Rates and effect sizes of the world. Hazards are per hour; effects are on log-hazard."""

    buyer_base_per_hour: float = 5e-5
    remorse_effect: float = 2.2  # added at the moment of ordering, decays with remorse_hours
    remorse_hours: float = 20.0
    price_drop_effect: float = 8.0  # per unit of relative drop below the price paid
    promo_visible_effect: float = 0.4  # the lower price is a visible promotion
    quiet_after_days: float = 2.0  # tracking silence that buyers tolerate
    quiet_effect_per_day: float = 0.45
    quiet_cap_days: float = 8.0
    late_effect_per_day: float = 0.35
    late_cap_days: float = 10.0
    not_shipped_after_hours: float = 72.0
    not_shipped_effect_per_day: float = 0.5
    not_shipped_cap_days: float = 5.0
    card_edit_effect: float = 0.7  # per edit of the bought offer's card after purchase (max 3)
    date_change_effect: float = 0.25  # per delivery-date change (max 3)
    cod_effect: float = 0.6
    premium_effect: float = -0.5
    repeat_buyer_effect: float = -0.35
    fickleness_sd: float = 0.35  # hidden per-buyer propensity
    at_pickup_factor: float = 0.35  # hazard multiplier once the parcel waits at the pickup point
    # seller processing and competing cancellations
    handover_start_hours: float = 6.0
    handover_per_hour: float = 0.035
    slow_packing_share: float = 0.08  # postings whose goods are hard to source or pack
    slow_handover_per_hour: float = 0.008
    shipping_deadline_hours: float = 96.0
    seller_cancel_per_hour: float = 6e-5
    seller_cancel_late_per_hour: float = 0.01  # past the shipping deadline, not handed over
    ozon_cancel_after_deadline_hours: float = 72.0  # Ozon cancels what was never handed over
    delivery_cancel_per_hour: float = 8e-6
    lost_after_promise_days: float = 25.0  # carrier gives up on a parcel this late
    # transit
    transit_noise_shape: float = 4.0  # gamma shape of per-step progress noise
    scan_regularity: float = 6.0  # gamma shape of the gaps between scans (carriers scan at hops)
    quiet_progress_factor: float = 0.1
    pickup_per_hour: float = 1 / 36
    courier_per_hour: float = 1 / 8
    date_change_when_late_per_hour: float = 0.02
    date_change_shift_days: tuple[float, float] = (3.0, 7.0)
    # offers
    price_change_per_day: float = 0.05
    price_change_log_mean: float = -0.02
    price_change_log_sd: float = 0.09
    promo_per_day: float = 0.04
    promo_depth: tuple[float, float] = (0.08, 0.35)
    promo_hours: tuple[float, float] = (48.0, 240.0)
    card_edit_per_day: float = 0.06


@dataclass(frozen=True)
class SimulationConfig:
    days: int = 120
    orders_per_day: int = 150
    seed: int = 0
    start: str = "2026-06-01T00:00:00Z"
    n_offers: int = 60
    currency: str = "CNY"
    step_hours: float = 2.0
    truth_rollouts: int = 64
    horizon_days: float = 90.0  # how long the world runs after the export moment for outcomes
    dynamics: Dynamics = field(default_factory=Dynamics)


def world_arrays() -> dict[str, np.ndarray]:
    return {
        "transit_hours": np.array([c.transit_days * 24.0 for c in CARRIERS]),
        "scan_every": np.array([c.scan_every_hours for c in CARRIERS]),
        "quiet_per_day": np.array([c.quiet_per_day for c in CARRIERS]),
        "quiet_days": np.array([c.quiet_days for c in CARRIERS]),
        "promise_days": np.array([c.promise_days for c in CARRIERS]),
        "region_extra_hours": np.array([r.extra_days * 24.0 for r in REGIONS]),
    }


def with_dynamics(config: SimulationConfig, **changes: float) -> SimulationConfig:
    """A copy of ``config`` whose dynamics differ by ``changes`` (for experiments and tests)."""
    return replace(config, dynamics=replace(config.dynamics, **changes))
